/*
 * multiworld: collective communication for elastic model serving.
 *
 * NCCL's API with an `mw` prefix; result codes numbered as ncclResult_t's. Every call returns
 * a mwResult_t; mwGetErrorString() and mwGetLastError() describe it. See docs/c-api.md.
 */

#ifndef MULTIWORLD_H
#define MULTIWORLD_H

/* Generated from src/ffi/ by cbindgen (build.rs): do not edit by hand. */

#include <stddef.h>
#include <stdint.h>

/*
 Bytes of a `mwUniqueId`, as NCCL's.
 */
#define MW_UNIQUE_ID_BYTES 128

/*
 A world formed and is ready.
 */
#define MW_EVENT_READY 1

/*
 A world broke.
 */
#define MW_EVENT_BROKEN 2

/*
 A world was removed (its communicator destroyed or aborted).
 */
#define MW_EVENT_REMOVED 3

/*
 A member's registration of a world formed through etcd is gone (its process's lease expired
 or it removed the world); `peer` is its rank. The world is not broken by it.
 */
#define MW_EVENT_MEMBER_GONE 4

/*
 `color` of a rank of `mwCommSplit` that joins no new communicator (`NCCL_SPLIT_NOCOLOR`).
 */
#define MW_SPLIT_NOCOLOR -1

/*
 `mwCommShrink`: leave the parent's operations alone (`NCCL_SHRINK_DEFAULT`).
 */
#define MW_SHRINK_DEFAULT 0

/*
 `mwCommShrink`: abort the parent first, failing its operations in flight, as after a
 failure or a hang (`NCCL_SHRINK_ABORT`).
 */
#define MW_SHRINK_ABORT 1

/*
 Opaque communicator (never instantiated: a handle's value is a key of this layer's table).
 */
typedef struct mwComm mwComm;

/*
 Result of every call, numbered as NCCL's `ncclResult_t`.
 */
typedef int mwResult_t;

/*
 A communicator handle.
 */
typedef struct mwComm *mwComm_t;

/*
 Identifies one world formation; made by `mwGetUniqueId`, copied to every rank.
 */
typedef struct mwUniqueId {
  /*
   Opaque bytes.
   */
  char internal[MW_UNIQUE_ID_BYTES];
} mwUniqueId;

/*
 Settings of a communicator (`mwCommInitRankConfig`, `mwCommInitAt`). Start from
 `MW_CONFIG_INITIALIZER` or `mwConfigInit`, then change fields.
 */
typedef struct mwConfig_t {
  /*
   `sizeof(mwConfig_t)`, so that the library can tell versions apart.
   */
  size_t size;
  /*
   1: calls return when done. 0: calls return `mwInProgress` at once; poll
   `mwCommGetAsyncError` until it says `mwSuccess` (or an error).
   */
  int blocking;
  /*
   Formation deadline in milliseconds (default 30000).
   */
  int timeoutMs;
  /*
   Heartbeat interval in milliseconds (default 200); 0 turns heartbeats off.
   */
  int heartbeatIntervalMs;
  /*
   Silence, in milliseconds, after which a peer is declared hung (default 3000).
   */
  int heartbeatTimeoutMs;
  /*
   Deadline of every operation in milliseconds. 0 (the default): the process's default,
   `MW_OP_TIMEOUT_MS` if set, else none; -1: none, whatever the environment says. The
   only guard against a live peer that never makes the matching call.
   */
  int opTimeoutMs;
  /*
   0: shared memory where possible, else TCP (default); 1: TCP only.
   */
  int transport;
  /*
   What runs operations on device buffers (streams): 0 the library's own (default), 1
   NCCL (a build with the `nccl` feature and a loadable `libnccl.so`; host buffers are
   then refused). `MW_BACKEND=nccl` sets 1 for every communicator of the process.
   */
  int backend;
} mwConfig_t;

/*
 An event of one of the process's communicators.
 */
typedef struct mwEvent_t {
  /*
   `MW_EVENT_READY`, `MW_EVENT_BROKEN`, `MW_EVENT_REMOVED` or `MW_EVENT_MEMBER_GONE`.
   */
  int kind;
  /*
   Generation of the world.
   */
  int generation;
  /*
   For broken worlds, the peer rank the cause points at; for `MW_EVENT_MEMBER_GONE`, the
   member's rank; else -1.
   */
  int peer;
  /*
   The world's name, NUL-terminated (truncated to fit).
   */
  char name[256];
  /*
   For broken worlds, the cause, NUL-terminated (truncated to fit).
   */
  char cause[512];
} mwEvent_t;

/*
 Element type, numbered as NCCL's `ncclDataType_t`.
 */
typedef int mwDataType_t;

/*
 Reduction, numbered as NCCL's `ncclRedOp_t`.
 */
typedef int mwRedOp_t;

/*
 The call succeeded.
 */
#define mwSuccess 0

/*
 A CUDA call failed.
 */
#define mwUnhandledCudaError 1

/*
 A system call failed (socket, memory map, thread).
 */
#define mwSystemError 2

/*
 An internal inconsistency of multiworld.
 */
#define mwInternalError 3

/*
 An argument is wrong on this rank: null pointer, size overflow, unknown type or op, rank out
 of range, unknown communicator handle.
 */
#define mwInvalidArgument 4

/*
 The call is wrong in context: ranks called different operations, counts, types, ops or
 roots; the communicator is still forming.
 */
#define mwInvalidUsage 5

/*
 The world is broken: a peer died, hung, was cut off or aborted (NCCL's `ncclRemoteError`).
 */
#define mwRemoteError 6

/*
 A non-blocking call has not finished (poll `mwCommGetAsyncError`).
 */
#define mwInProgress 7

/*
 A deadline passed (formation, or an operation's own deadline). NCCL has no such code; 8 is
 left free because NCCL uses it for `ncclNumResults`.
 */
#define mwTimeout 9

/*
 `int8_t`.
 */
#define mwInt8 0

/*
 `char` (same as `mwInt8`).
 */
#define mwChar 0

/*
 `uint8_t`.
 */
#define mwUint8 1

/*
 `int32_t`.
 */
#define mwInt32 2

/*
 `int` (same as `mwInt32`).
 */
#define mwInt 2

/*
 `uint32_t`.
 */
#define mwUint32 3

/*
 `int64_t`.
 */
#define mwInt64 4

/*
 `uint64_t`.
 */
#define mwUint64 5

/*
 IEEE half precision.
 */
#define mwFloat16 6

/*
 Same as `mwFloat16`.
 */
#define mwHalf 6

/*
 `float`.
 */
#define mwFloat32 7

/*
 Same as `mwFloat32`.
 */
#define mwFloat 7

/*
 `double`.
 */
#define mwFloat64 8

/*
 Same as `mwFloat64`.
 */
#define mwDouble 8

/*
 bfloat16.
 */
#define mwBfloat16 9

/*
 Sum.
 */
#define mwSum 0

/*
 Product.
 */
#define mwProd 1

/*
 Maximum.
 */
#define mwMax 2

/*
 Minimum.
 */
#define mwMin 3

/*
 Average.
 */
#define mwAvg 4

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/*
 Library version: `major * 10000 + minor * 100 + patch`.
 */
mwResult_t mwGetVersion(int *version);

/*
 A static description of a result code (`ncclGetErrorString`).
 */
const char *mwGetErrorString(mwResult_t result);

/*
 The message of the last error on `comm` (or, with `comm` NULL or unknown, of the last error
 that had no communicator). The string stays valid until this thread calls
 `mwGetLastError` again (`ncclGetLastError`).
 */
const char *mwGetLastError(mwComm_t comm);

/*
 Makes a unique id and starts its rendezvous root in this process (`ncclGetUniqueId`).
 */
mwResult_t mwGetUniqueId(struct mwUniqueId *uniqueId);

/*
 Fills `config` with the defaults (same as `MW_CONFIG_INITIALIZER`).
 */
mwResult_t mwConfigInit(struct mwConfig_t *config);

/*
 Joins the world of `commId` as `rank` of `nranks` (`ncclCommInitRank`).
 */
mwResult_t mwCommInitRank(mwComm_t *comm, int nranks, struct mwUniqueId commId, int rank);

/*
 [`mwCommInitRank`] with settings (`ncclCommInitRankConfig`). With `config->blocking = 0` it
 returns `mwInProgress` at once; poll `mwCommGetAsyncError`.
 */
mwResult_t mwCommInitRankConfig(mwComm_t *comm,
                                int nranks,
                                struct mwUniqueId commId,
                                int rank,
                                struct mwConfig_t *config);

/*
 Joins world `name` by address (MultiWorld's way): rank 0 listens on `address`
 (`"host:port"`), the others connect to it; or, in a library built with the `etcd` feature,
 through etcd (`"etcd://host:port[,host:port...]/prefix"`, no root: docs/etcd.md). `config`
 may be NULL.
 */
mwResult_t mwCommInitAt(mwComm_t *comm,
                        const char *name,
                        const char *address,
                        int nranks,
                        int rank,
                        struct mwConfig_t *config);

/*
 State of a communicator: `mwSuccess` when ready and nothing is in flight,
 `mwInProgress` while forming or while non-blocking operations run, else the error that
 ended it (`ncclCommGetAsyncError`).
 */
mwResult_t mwCommGetAsyncError(mwComm_t comm, mwResult_t *asyncError);

/*
 Aborts a communicator and frees it: local, needs no peer; operations in flight fail
 (`ncclCommAbort`).
 */
mwResult_t mwCommAbort(mwComm_t comm);

/*
 Frees a communicator. An idle one leaves its world gracefully (its peers see it leave);
 host operations still in flight are aborted — wait for them with `mwCommGetAsyncError`
 first; operations enqueued on streams run first (`ncclCommDestroy`).
 */
mwResult_t mwCommDestroy(mwComm_t comm);

/*
 Number of ranks (`ncclCommCount`).
 */
mwResult_t mwCommCount(mwComm_t comm, int *count);

/*
 This process's rank (`ncclCommUserRank`).
 */
mwResult_t mwCommUserRank(mwComm_t comm, int *rank);

/*
 Splits `comm` (`ncclCommSplit`): ranks with the same `color` form a new communicator,
 ranked by `(key, rank in comm)`; `MW_SPLIT_NOCOLOR` takes part and gets `*newcomm = NULL`.
 Collective over `comm`.
 */
mwResult_t mwCommSplit(mwComm_t comm,
                       int color,
                       int key,
                       mwComm_t *newcomm,
                       struct mwConfig_t *config);

/*
 A new communicator of every rank of `comm` but the `excludeRanksCount` ranks of
 `excludeRanksList` (`ncclCommShrink`), called by the others only, also on a broken `comm`.
 `shrinkFlags`: `MW_SHRINK_DEFAULT`, or `MW_SHRINK_ABORT` to abort `comm` first.
 */
mwResult_t mwCommShrink(mwComm_t comm,
                        const int *excludeRanksList,
                        int excludeRanksCount,
                        mwComm_t *newcomm,
                        struct mwConfig_t *config,
                        int shrinkFlags);

/*
 Makes the id of a `mwCommGrow` (`ncclCommGetUniqueId`): called by rank 0 of `comm`, which
 gives it to the newcomers; the members get it from rank 0 inside `mwCommGrow`.
 */
mwResult_t mwCommGetUniqueId(mwComm_t comm, struct mwUniqueId *uniqueId);

/*
 A larger communicator (`ncclCommGrow`). Members of `comm` pass `rank = -1` and keep their
 ranks; rank 0 of `comm` passes the id it made with `mwCommGetUniqueId` (the others may pass
 `NULL`: they get it from rank 0). Newcomers pass `comm = NULL`, the id and their rank, from
 the size of `comm` up to `nRanks - 1`, before or after the members call.
 */
mwResult_t mwCommGrow(mwComm_t comm,
                      int nRanks,
                      const struct mwUniqueId *uniqueId,
                      int rank,
                      mwComm_t *newcomm,
                      struct mwConfig_t *config);

/*
 Takes the next event of any communicator of this process: `mwSuccess` with `*event`
 filled, or `mwInProgress` when there is none. Never blocks.
 */
mwResult_t mwPollEvent(struct mwEvent_t *event);

/*
 Like `mwPollEvent`, waiting up to `timeoutMs` milliseconds (negative: for ever).
 */
mwResult_t mwWaitEvent(struct mwEvent_t *event, int timeoutMs);

/*
 Starts a group: calls until the matching `mwGroupEnd` are posted together, so that sends
 and receives between the same ranks cannot deadlock, and several communicators can be
 initialized from one thread (`ncclGroupStart`; groups nest).
 */
mwResult_t mwGroupStart(void);

/*
 Ends a group; the outermost end posts everything recorded and, for blocking
 communicators, waits for it (`ncclGroupEnd`). Returns the first error.
 */
mwResult_t mwGroupEnd(void);

/*
 Sends `count` elements to `peer`, which posts a matching `mwRecv` (`ncclSend`).
 */
mwResult_t mwSend(const void *sendbuff,
                  size_t count,
                  mwDataType_t datatype,
                  int peer,
                  mwComm_t comm,
                  void *stream);

/*
 Receives `count` elements from `peer` (`ncclRecv`).
 */
mwResult_t mwRecv(void *recvbuff,
                  size_t count,
                  mwDataType_t datatype,
                  int peer,
                  mwComm_t comm,
                  void *stream);

/*
 Copies the root's `sendbuff` into every rank's `recvbuff` (`ncclBroadcast`; in place when
 the two are equal).
 */
mwResult_t mwBroadcast(const void *sendbuff,
                       void *recvbuff,
                       size_t count,
                       mwDataType_t datatype,
                       int root,
                       mwComm_t comm,
                       void *stream);

/*
 Reduces every rank's `sendbuff` into the root's `recvbuff` (`ncclReduce`).
 */
mwResult_t mwReduce(const void *sendbuff,
                    void *recvbuff,
                    size_t count,
                    mwDataType_t datatype,
                    mwRedOp_t op,
                    int root,
                    mwComm_t comm,
                    void *stream);

/*
 Reduces every rank's `sendbuff`; every rank gets the result in `recvbuff`
 (`ncclAllReduce`).
 */
mwResult_t mwAllReduce(const void *sendbuff,
                       void *recvbuff,
                       size_t count,
                       mwDataType_t datatype,
                       mwRedOp_t op,
                       mwComm_t comm,
                       void *stream);

/*
 Gathers `sendcount` elements from every rank into every rank's `recvbuff`, in rank order
 (`ncclAllGather`).
 */
mwResult_t mwAllGather(const void *sendbuff,
                       void *recvbuff,
                       size_t sendcount,
                       mwDataType_t datatype,
                       mwComm_t comm,
                       void *stream);

/*
 Reduces every rank's `sendbuff` (`recvcount` elements per rank); rank `r` gets block `r`
 (`ncclReduceScatter`).
 */
mwResult_t mwReduceScatter(const void *sendbuff,
                           void *recvbuff,
                           size_t recvcount,
                           mwDataType_t datatype,
                           mwRedOp_t op,
                           mwComm_t comm,
                           void *stream);

/*
 Sends block `r` (of `count` elements) of `sendbuff` to rank `r`, which stores it as block
 `rank` of its `recvbuff` (`ncclAlltoAll`).
 */
mwResult_t mwAllToAll(const void *sendbuff,
                      void *recvbuff,
                      size_t count,
                      mwDataType_t datatype,
                      mwComm_t comm,
                      void *stream);

/*
 Gathers `sendcount` elements from every rank into the root's `recvbuff` (`ncclGather`).
 */
mwResult_t mwGather(const void *sendbuff,
                    void *recvbuff,
                    size_t sendcount,
                    mwDataType_t datatype,
                    int root,
                    mwComm_t comm,
                    void *stream);

/*
 Sends block `r` (of `recvcount` elements) of the root's `sendbuff` to rank `r`
 (`ncclScatter`).
 */
mwResult_t mwScatter(const void *sendbuff,
                     void *recvbuff,
                     size_t recvcount,
                     mwDataType_t datatype,
                     int root,
                     mwComm_t comm,
                     void *stream);

/*
 Returns once every rank has called it.
 */
mwResult_t mwBarrier(mwComm_t comm, void *stream);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* MULTIWORLD_H */

/* Defaults for mwConfig_t, in field order (same as mwConfigInit). */
#define MW_CONFIG_INITIALIZER { sizeof(mwConfig_t), 1, 30000, 200, 3000, 0, 0, 0 }
