/* Tests of the multiworld C API: every function, its error paths, and a killed peer.
 * Each test prints "ok - <name>"; the program exits non-zero on the first failure. */
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "ranks.h"

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* ---- calls that need no peer ---- */

static void test_version_and_strings(void) {
  int v = -1;
  MWCHECK(mwGetVersion(&v));
  CHECK(v >= 100); /* 0.1.0 -> 100 */
  CHECK(mwGetVersion(NULL) == mwInvalidArgument);
  CHECK(strcmp(mwGetErrorString(mwSuccess), "no error") == 0);
  CHECK(strstr(mwGetErrorString(mwRemoteError), "broken") != NULL);
  CHECK(strstr(mwGetErrorString(12345), "unknown") != NULL);
  CHECK(mwGetLastError(NULL) != NULL);
  printf("ok - version and error strings\n");
}

static void test_bad_arguments(void) {
  mwComm_t comm = NULL;
  mwUniqueId id;
  memset(&id, 0, sizeof id);
  CHECK(mwGetUniqueId(NULL) == mwInvalidArgument);
  CHECK(mwCommInitRank(&comm, 2, id, 0) == mwInvalidArgument); /* not an id */
  CHECK(strstr(mwGetLastError(NULL), "unique id") != NULL);
  MWCHECK(mwGetUniqueId(&id));
  CHECK(mwCommInitRank(NULL, 2, id, 0) == mwInvalidArgument);
  CHECK(mwCommInitRank(&comm, 0, id, 0) == mwInvalidArgument);
  CHECK(mwCommInitRank(&comm, 2, id, 2) == mwInvalidArgument);
  CHECK(mwCommInitRank(&comm, 2, id, -1) == mwInvalidArgument);
  mwConfig_t cfg = MW_CONFIG_INITIALIZER;
  cfg.size = 3;
  CHECK(mwCommInitRankConfig(&comm, 1, id, 0, &cfg) == mwInvalidArgument);
  CHECK(strstr(mwGetLastError(NULL), "config.size") != NULL);
  MWCHECK(mwConfigInit(&cfg));
  cfg.transport = 7;
  CHECK(mwCommInitRankConfig(&comm, 1, id, 0, &cfg) == mwInvalidArgument);
  CHECK(mwConfigInit(NULL) == mwInvalidArgument);
  CHECK(mwCommInitAt(&comm, NULL, "127.0.0.1:1", 2, 0, NULL) == mwInvalidArgument);
  /* Handles that were never created, or were destroyed, are refused, not dereferenced. */
  mwComm_t bogus = (mwComm_t)(uintptr_t)0xdeadbeef;
  int n = 0;
  float x = 1;
  CHECK(mwCommCount(bogus, &n) == mwInvalidArgument);
  CHECK(mwCommUserRank(NULL, &n) == mwInvalidArgument);
  CHECK(mwAllReduce(&x, &x, 1, mwFloat, mwSum, bogus, NULL) == mwInvalidArgument);
  CHECK(mwCommDestroy(bogus) == mwInvalidArgument);
  CHECK(mwCommAbort(NULL) == mwInvalidArgument);
  mwResult_t st;
  CHECK(mwCommGetAsyncError(bogus, &st) == mwInvalidArgument);
  CHECK(mwGroupEnd() == mwInvalidUsage);
  mwEvent_t ev;
  CHECK(mwPollEvent(NULL) == mwInvalidArgument);
  CHECK(mwWaitEvent(&ev, 0) == mwInProgress || mwWaitEvent(&ev, 0) == mwSuccess);
  /* The backend: 0 or 1. NCCL needs the nccl feature and a loadable libnccl.so; where it
   * has both, the communicator forms and refuses host buffers. */
  MWCHECK(mwConfigInit(&cfg));
  cfg.backend = 2;
  CHECK(mwCommInitRankConfig(&comm, 1, id, 0, &cfg) == mwInvalidArgument);
  cfg.backend = 1;
  mwResult_t r = mwCommInitRankConfig(&comm, 1, id, 0, &cfg);
  if (r == mwSuccess) {
    CHECK(mwAllReduce(&x, &x, 1, mwFloat, mwSum, comm, NULL) == mwInvalidUsage);
    CHECK(strstr(mwGetLastError(comm), "NCCL") != NULL);
    MWCHECK(mwCommDestroy(comm));
    printf("ok - an NCCL communicator refuses host buffers\n");
  } else {
    /* No nccl feature: an invalid argument; no libnccl.so: a system error. Both say why. */
    CHECK(r == mwInvalidArgument || r == mwSystemError);
    CHECK(strstr(mwGetLastError(NULL), "nccl") != NULL || strstr(mwGetLastError(NULL), "NCCL") != NULL);
    printf("ok - asking for NCCL where it cannot run: %s\n", mwGetLastError(NULL));
  }
  printf("ok - bad arguments and handles\n");
}

/* A world of one rank, for argument checks of the operations. */
static void test_operation_arguments(void) {
  mwUniqueId id;
  mwComm_t comm;
  MWCHECK(mwGetUniqueId(&id));
  MWCHECK(mwCommInitRank(&comm, 1, id, 0));
  float a[4] = {1, 2, 3, 4}, b[4];
  CHECK(mwAllReduce(a, b, 4, 42, mwSum, comm, NULL) == mwInvalidArgument);
  CHECK(strstr(mwGetLastError(comm), "unknown data type 42") != NULL);
  CHECK(mwAllReduce(a, b, 4, -1, mwSum, comm, NULL) == mwInvalidArgument);
  CHECK(mwAllReduce(a, b, 4, mwFloat, 99, comm, NULL) == mwInvalidArgument);
  CHECK(mwAllReduce(NULL, b, 4, mwFloat, mwSum, comm, NULL) == mwInvalidArgument);
  CHECK(mwAllReduce(a, NULL, 4, mwFloat, mwSum, comm, NULL) == mwInvalidArgument);
  CHECK(mwAllReduce(a, b, SIZE_MAX / 2, mwFloat, mwSum, comm, NULL) == mwInvalidArgument);
  CHECK(strstr(mwGetLastError(comm), "overflow") != NULL);
  /* Byte sizes beyond PTRDIFF_MAX can only run past the buffer: refused, also in place. */
  int8_t *c8 = (int8_t *)a;
  size_t huge = (size_t)PTRDIFF_MAX + 1;
  CHECK(mwSend(c8, SIZE_MAX, mwInt8, 0, comm, NULL) == mwInvalidArgument);
  CHECK(strstr(mwGetLastError(comm), "PTRDIFF_MAX") != NULL);
  CHECK(mwRecv(c8, huge, mwInt8, 0, comm, NULL) == mwInvalidArgument);
  CHECK(mwAllGather(c8, c8, huge, mwInt8, comm, NULL) == mwInvalidArgument);
  CHECK(mwBroadcast(c8, c8, huge, mwInt8, 0, comm, NULL) == mwInvalidArgument);
  CHECK(mwReduce(c8, c8, huge, mwInt8, mwSum, 0, comm, NULL) == mwInvalidArgument);
  CHECK(mwAllReduce(c8, c8, huge, mwInt8, mwSum, comm, NULL) == mwInvalidArgument);
  CHECK(mwAllReduce(a, a + 1, 3, mwFloat, mwSum, comm, NULL) == mwInvalidArgument); /* overlap */
  CHECK(mwAllReduce(a, b, 4, mwFloat, mwSum, comm, (void *)1) == mwInvalidArgument); /* stream */
  CHECK(mwSend(a, 4, mwFloat, 1, comm, NULL) == mwInvalidArgument);
  CHECK(mwRecv(b, 4, mwFloat, -3, comm, NULL) == mwInvalidArgument);
  CHECK(mwBroadcast(a, b, 4, mwFloat, 5, comm, NULL) == mwInvalidArgument);
  CHECK(mwReduce(a, b, 4, mwFloat, mwSum, 1, comm, NULL) == mwInvalidArgument);
  CHECK(mwGather(a, b, 4, mwFloat, 2, comm, NULL) == mwInvalidArgument);
  CHECK(mwScatter(a, b, 4, mwFloat, -1, comm, NULL) == mwInvalidArgument);
  CHECK(mwCommCount(comm, NULL) == mwInvalidArgument);
  CHECK(mwCommGetAsyncError(comm, NULL) == mwInvalidArgument);
  /* None of that harmed the communicator; zero counts accept NULL buffers. */
  MWCHECK(mwAllReduce(a, b, 4, mwFloat, mwSum, comm, NULL));
  CHECK(b[3] == 4);
  MWCHECK(mwAllReduce(NULL, NULL, 0, mwFloat, mwSum, comm, NULL));
  MWCHECK(mwBarrier(comm, NULL));
  int n = 0, r = -1;
  MWCHECK(mwCommCount(comm, &n));
  MWCHECK(mwCommUserRank(comm, &r));
  CHECK(n == 1 && r == 0);
  MWCHECK(mwCommDestroy(comm));
  CHECK(mwCommDestroy(comm) == mwInvalidArgument); /* destroyed handle */
  CHECK(mwBarrier(comm, NULL) == mwInvalidArgument);
  printf("ok - operation arguments\n");
}

/* ---- every collective across processes ---- */

static void collectives(int rank, int n, mwUniqueId id, const char *arg) {
  (void)arg;
  mwComm_t comm;
  MWCHECK(mwCommInitRank(&comm, n, id, rank));
  int cnt, me;
  MWCHECK(mwCommCount(comm, &cnt));
  MWCHECK(mwCommUserRank(comm, &me));
  CHECK(cnt == n && me == rank);
  enum { C = 1000 };
  static float s[C * 8], r[C * 8];
  for (int i = 0; i < C; i++) s[i] = (float)(rank + 1);
  /* all-reduce, out of place and in place */
  MWCHECK(mwAllReduce(s, r, C, mwFloat, mwSum, comm, NULL));
  for (int i = 0; i < C; i++) CHECK(r[i] == n * (n + 1) / 2.0f);
  MWCHECK(mwAllReduce(r, r, C, mwFloat, mwMax, comm, NULL));
  CHECK(r[0] == n * (n + 1) / 2.0f);
  /* broadcast from the last rank */
  for (int i = 0; i < C; i++) r[i] = rank == n - 1 ? 7.0f : 0.0f;
  MWCHECK(mwBroadcast(r, r, C, mwFloat, n - 1, comm, NULL));
  CHECK(r[C - 1] == 7.0f);
  /* reduce to rank 0 */
  int32_t iv = rank + 1, out = 0;
  MWCHECK(mwReduce(&iv, &out, 1, mwInt32, mwProd, 0, comm, NULL));
  if (rank == 0) {
    int32_t f = 1;
    for (int k = 1; k <= n; k++) f *= k;
    CHECK(out == f);
  }
  /* all-gather, out of place and in place */
  double dv = rank, all[8];
  MWCHECK(mwAllGather(&dv, all, 1, mwDouble, comm, NULL));
  for (int k = 0; k < n; k++) CHECK(all[k] == k);
  all[rank] = rank * 10.0;
  MWCHECK(mwAllGather(all + rank, all, 1, mwDouble, comm, NULL));
  for (int k = 0; k < n; k++) CHECK(all[k] == k * 10.0);
  /* reduce-scatter: block k of every rank holds k; rank k gets n*k */
  int64_t blocks[8], mine = -1;
  for (int k = 0; k < n; k++) blocks[k] = k;
  MWCHECK(mwReduceScatter(blocks, &mine, 1, mwInt64, mwSum, comm, NULL));
  CHECK(mine == (int64_t)n * rank);
  MWCHECK(mwReduceScatter(blocks, blocks + rank, 1, mwInt64, mwSum, comm, NULL)); /* in place */
  CHECK(blocks[rank] == (int64_t)n * rank);
  /* all-to-all: block k of rank r holds 100 r + k */
  uint32_t a2a_s[8], a2a_r[8];
  for (int k = 0; k < n; k++) a2a_s[k] = 100 * rank + k;
  MWCHECK(mwAllToAll(a2a_s, a2a_r, 1, mwUint32, comm, NULL));
  for (int k = 0; k < n; k++) CHECK(a2a_r[k] == (uint32_t)(100 * k + rank));
  /* gather and scatter at rank 1 */
  uint8_t g[8] = {0}, one = (uint8_t)(rank + 1);
  MWCHECK(mwGather(&one, g, 1, mwUint8, 1, comm, NULL));
  if (rank == 1)
    for (int k = 0; k < n; k++) CHECK(g[k] == k + 1);
  uint8_t sc[8], got = 0;
  for (int k = 0; k < n; k++) sc[k] = (uint8_t)(50 + k);
  MWCHECK(mwScatter(sc, &got, 1, mwUint8, 1, comm, NULL));
  CHECK(got == 50 + rank);
  /* send/recv around a ring, in a group */
  float ring_out = (float)rank, ring_in = -1;
  MWCHECK(mwGroupStart());
  MWCHECK(mwSend(&ring_out, 1, mwFloat, (rank + 1) % n, comm, NULL));
  MWCHECK(mwRecv(&ring_in, 1, mwFloat, (rank + n - 1) % n, comm, NULL));
  MWCHECK(mwGroupEnd());
  CHECK(ring_in == (float)((rank + n - 1) % n));
  MWCHECK(mwBarrier(comm, NULL));
  MWCHECK(mwCommDestroy(comm));
}

static void test_collectives(void) {
  CHECK(run_ranks(3, "collectives", NULL) == 0);
  printf("ok - every collective across 3 processes\n");
}

/* Ranks that disagree on the count: both told, with both calls named. */
static void mismatch(int rank, int n, mwUniqueId id, const char *arg) {
  (void)arg;
  mwComm_t comm;
  MWCHECK(mwCommInitRank(&comm, n, id, rank));
  float v[8] = {0};
  mwResult_t r = mwAllReduce(v, v, (size_t)(4 + rank), mwFloat, mwSum, comm, NULL);
  CHECK(r == mwInvalidUsage || r == mwRemoteError);
  CHECK(strstr(mwGetLastError(comm), "count=4") != NULL);
  mwResult_t st;
  MWCHECK(mwCommGetAsyncError(comm, &st));
  CHECK(st == mwRemoteError || st == mwInvalidUsage);
  MWCHECK(mwCommAbort(comm));
}

static void test_mismatch(void) {
  CHECK(run_ranks(2, "mismatch", NULL) == 0);
  printf("ok - mismatched calls reported on both ranks\n");
}

/* ---- non-blocking communicators ---- */

static void nonblocking(int rank, int n, mwUniqueId id, const char *arg) {
  (void)arg;
  mwComm_t comm;
  mwConfig_t cfg = MW_CONFIG_INITIALIZER;
  cfg.blocking = 0;
  mwResult_t r = mwCommInitRankConfig(&comm, n, id, rank, &cfg);
  CHECK(r == mwInProgress);
  mwResult_t st = mwInProgress;
  while (st == mwInProgress) MWCHECK(mwCommGetAsyncError(comm, &st));
  CHECK(st == mwSuccess);
  static int64_t v[100000];
  for (int i = 0; i < 100000; i++) v[i] = rank + i;
  CHECK(mwAllReduce(v, v, 100000, mwInt64, mwSum, comm, NULL) == mwInProgress);
  st = mwInProgress;
  while (st == mwInProgress) MWCHECK(mwCommGetAsyncError(comm, &st));
  CHECK(st == mwSuccess);
  for (int i = 0; i < 100000; i++) CHECK(v[i] == (int64_t)n * i + n * (n - 1) / 2);
  MWCHECK(mwCommDestroy(comm));
}

static void test_nonblocking(void) {
  CHECK(run_ranks(2, "nonblocking", NULL) == 0);
  printf("ok - non-blocking communicator and operation\n");
}

/* ---- the address form ---- */

static void by_address(int rank, int n, mwUniqueId id, const char *addr) {
  (void)id;
  mwComm_t comm;
  MWCHECK(mwCommInitAt(&comm, "c-by-address", addr, n, rank, NULL));
  int x = rank + 1;
  MWCHECK(mwAllReduce(&x, &x, 1, mwInt, mwSum, comm, NULL));
  CHECK(x == n * (n + 1) / 2);
  mwEvent_t ev;
  int ready = 0;
  while (!ready && mwWaitEvent(&ev, 5000) == mwSuccess)
    ready = ev.kind == MW_EVENT_READY && strcmp(ev.name, "c-by-address") == 0 && ev.generation == 1;
  CHECK(ready);
  MWCHECK(mwCommDestroy(comm));
}

static void test_address(void) {
  char addr[64];
  snprintf(addr, sizeof addr, "127.0.0.1:%d", 20000 + (int)(getpid() % 12000));
  CHECK(run_ranks(3, "by_address", addr) == 0);
  printf("ok - formation by address, ready event\n");
}

/* ---- several ranks in one process, initialized in a group (as NCCL allows) ---- */

static void test_group_init(void) {
  mwUniqueId id;
  mwComm_t comms[2];
  MWCHECK(mwGetUniqueId(&id));
  MWCHECK(mwGroupStart());
  for (int r = 0; r < 2; r++) MWCHECK(mwCommInitRank(&comms[r], 2, id, r));
  MWCHECK(mwGroupEnd());
  float v[2][3] = {{1, 2, 3}, {10, 20, 30}};
  MWCHECK(mwGroupStart());
  for (int r = 0; r < 2; r++) MWCHECK(mwAllReduce(v[r], v[r], 3, mwFloat, mwSum, comms[r], NULL));
  MWCHECK(mwGroupEnd());
  CHECK(v[0][2] == 33 && v[1][0] == 11);
  for (int r = 0; r < 2; r++) MWCHECK(mwCommDestroy(comms[r]));
  printf("ok - two ranks in one thread, formed and used in groups\n");
}

/* ---- communicators made from communicators ---- */

static int sum_of(mwComm_t c, int v) {
  MWCHECK(mwAllReduce(&v, &v, 1, mwInt, mwSum, c, NULL));
  return v;
}

/* The communicator has `size` ranks and this is rank `rank`. */
static void check_shape(mwComm_t c, int size, int rank) {
  int cnt = -1, me = -1;
  MWCHECK(mwCommCount(c, &cnt));
  MWCHECK(mwCommUserRank(c, &me));
  CHECK(cnt == size && me == rank);
}

static void elastic(int rank, int n, mwUniqueId id, const char *arg) {
  (void)arg;
  mwComm_t comm, half, most = NULL, rest = NULL;
  MWCHECK(mwCommInitRank(&comm, n, id, rank));
  /* By parity, keys reversed: the highest rank of each parity comes first. */
  MWCHECK(mwCommSplit(comm, rank % 2, n - rank, &half, NULL));
  int mates = 0, pos = -1, want = 0;
  for (int r = n - 1; r >= 0; r--)
    if (r % 2 == rank % 2) {
      if (r == rank) pos = mates;
      mates++;
      want += r + 1;
    }
  check_shape(half, mates, pos);
  CHECK(sum_of(half, rank + 1) == want);
  CHECK(sum_of(comm, rank + 1) == n * (n + 1) / 2);
  /* The last rank takes part without a colour and gets no communicator. */
  MWCHECK(mwCommSplit(comm, rank == n - 1 ? MW_SPLIT_NOCOLOR : 0, 0, &most, NULL));
  CHECK((most == NULL) == (rank == n - 1));
  if (most) {
    check_shape(most, n - 1, rank);
    CHECK(sum_of(most, 1) == n - 1);
  }
  /* Bad arguments: this rank's own error, at once. */
  int self = rank;
  CHECK(mwCommShrink(comm, &self, 1, &rest, NULL, MW_SHRINK_DEFAULT) == mwInvalidArgument);
  CHECK(strstr(mwGetLastError(comm), "exclude itself") != NULL);
  CHECK(mwCommShrink(comm, NULL, 1, &rest, NULL, MW_SHRINK_DEFAULT) == mwInvalidArgument);
  CHECK(mwCommShrink(comm, &self, 1, &rest, NULL, 7) == mwInvalidArgument);
  CHECK(mwCommSplit(comm, -5, 0, &rest, NULL) == mwInvalidArgument);
  CHECK(mwCommSplit(comm, 0, 0, NULL, NULL) == mwInvalidArgument);
  CHECK(mwCommGrow(comm, n + 1, NULL, 2, &rest, NULL) == mwInvalidArgument);
  CHECK(mwCommGrow(NULL, n + 1, NULL, 2, &rest, NULL) == mwInvalidArgument);
  /* The others shrink without the last rank, which lives and does not call. */
  if (rank != n - 1) {
    int last = n - 1;
    MWCHECK(mwCommShrink(comm, &last, 1, &rest, NULL, MW_SHRINK_DEFAULT));
    check_shape(rest, n - 1, rank);
    CHECK(sum_of(rest, rank + 1) == (n - 1) * n / 2);
    MWCHECK(mwBarrier(rest, NULL));
    MWCHECK(mwCommDestroy(rest));
  }
  /* Destroying the children leaves the parent working. */
  MWCHECK(mwBarrier(half, NULL));
  MWCHECK(mwCommDestroy(half));
  if (most) {
    MWCHECK(mwBarrier(most, NULL));
    MWCHECK(mwCommDestroy(most));
  }
  CHECK(sum_of(comm, 1) == n);
  MWCHECK(mwBarrier(comm, NULL));
  MWCHECK(mwCommDestroy(comm));
}

static void test_elastic(void) {
  CHECK(run_ranks(4, "elastic", NULL) == 0);
  printf("ok - split by parity, no colour, shrink without a live rank, bad arguments\n");
}

/* The same on non-blocking communicators: split and shrink return mwInProgress with the new
 * handle at once; mwCommGetAsyncError says when it is ready. */
static void wait_ready(mwComm_t c) {
  mwResult_t st = mwInProgress;
  /* Polled with a pause: a loop that never sleeps would take a core from the peers (and this
   * process's own progress thread) on a 2-core machine, more so under valgrind. */
  MWCHECK(mwCommGetAsyncError(c, &st));
  while (st == mwInProgress) {
    usleep(100);
    MWCHECK(mwCommGetAsyncError(c, &st));
  }
  if (st != mwSuccess) fprintf(stderr, "wait_ready: %d: %s\n", st, mwGetLastError(c));
  CHECK(st == mwSuccess);
}

/* A last barrier before destroying: a peer that passed it may leave (destroy) before this
 * rank looks, which is a departure, not a fault: the state stays mwSuccess. */
static void last_barrier(mwComm_t c) {
  CHECK(mwBarrier(c, NULL) == mwInProgress);
  wait_ready(c);
}

static int nb_sum_of(mwComm_t c, int v) {
  mwResult_t r = mwAllReduce(&v, &v, 1, mwInt, mwSum, c, NULL);
  if (r != mwInProgress) fprintf(stderr, "nb_sum_of: %d %s\n", r, mwGetLastError(c));
  CHECK(r == mwInProgress);
  wait_ready(c);
  return v;
}

static void nonblocking_elastic(int rank, int n, mwUniqueId id, const char *arg) {
  (void)arg;
  mwComm_t comm, half, rest = NULL;
  mwConfig_t cfg = MW_CONFIG_INITIALIZER;
  cfg.blocking = 0;
  cfg.heartbeatTimeoutMs = 30000; /* not a detection test: valgrind may stall a rank for seconds */
  CHECK(mwCommInitRankConfig(&comm, n, id, rank, &cfg) == mwInProgress);
  wait_ready(comm);
  /* By parity, keys ascending: the new handle at once, its shape once it is made. */
  CHECK(mwCommSplit(comm, rank % 2, rank, &half, NULL) == mwInProgress);
  CHECK(half != NULL);
  int cnt = -1;
  mwResult_t r = mwCommCount(half, &cnt);
  CHECK(r == mwInProgress || r == mwSuccess);
  wait_ready(half);
  int mates = (n - rank % 2 + 1) / 2;
  check_shape(half, mates, rank / 2);
  CHECK(nb_sum_of(half, 1) == mates);
  /* A colour of none: no handle, and the parent goes on. */
  mwComm_t none = half;
  CHECK(mwCommSplit(comm, MW_SPLIT_NOCOLOR, 0, &none, NULL) == mwSuccess);
  CHECK(none == NULL);
  CHECK(nb_sum_of(comm, 1) == n);
  /* Shrink without the last rank, which lives and does not call; its shape is known at once. */
  if (rank != n - 1) {
    int last = n - 1;
    CHECK(mwCommShrink(comm, &last, 1, &rest, NULL, MW_SHRINK_DEFAULT) == mwInProgress);
    check_shape(rest, n - 1, rank);
    wait_ready(rest);
    CHECK(nb_sum_of(rest, rank + 1) == (n - 1) * n / 2);
    last_barrier(rest);
    MWCHECK(mwCommDestroy(rest));
  }
  last_barrier(half);
  MWCHECK(mwCommDestroy(half));
  last_barrier(comm);
  MWCHECK(mwCommDestroy(comm));
}

static void test_nonblocking_elastic(void) {
  CHECK(run_ranks(3, "nonblocking_elastic", NULL) == 0);
  printf("ok - non-blocking split (with and without a colour) and shrink\n");
}

static void shrink_killed(int rank, int n, mwUniqueId id, const char *arg) {
  (void)arg;
  mwComm_t comm, rest;
  mwConfig_t cfg = MW_CONFIG_INITIALIZER;
  cfg.heartbeatIntervalMs = 100;
  cfg.heartbeatTimeoutMs = 1000;
  MWCHECK(mwCommInitRankConfig(&comm, n, id, rank, &cfg));
  MWCHECK(mwBarrier(comm, NULL));
  if (rank == n - 1) kill(getpid(), SIGKILL);
  int x = 1;
  CHECK(mwAllReduce(&x, &x, 1, mwInt, mwSum, comm, NULL) == mwRemoteError);
  int dead = n - 1;
  MWCHECK(mwCommShrink(comm, &dead, 1, &rest, NULL, MW_SHRINK_ABORT));
  check_shape(rest, n - 1, rank);
  CHECK(sum_of(rest, rank + 1) == (n - 1) * n / 2);
  MWCHECK(mwBarrier(rest, NULL));
  MWCHECK(mwCommDestroy(rest));
  MWCHECK(mwCommAbort(comm));
}

static void test_shrink_killed(void) {
  pid_t pids[3];
  spawn_ranks(3, "shrink_killed", NULL, pids);
  int s[3];
  for (int r = 0; r < 3; r++) waitpid(pids[r], &s[r], 0);
  CHECK(WIFEXITED(s[0]) && WEXITSTATUS(s[0]) == 0);
  CHECK(WIFEXITED(s[1]) && WEXITSTATUS(s[1]) == 0);
  CHECK(WIFSIGNALED(s[2]) && WTERMSIG(s[2]) == SIGKILL);
  printf("ok - survivors of a killed rank shrink and go on\n");
}

/* Ranks 0 and 1 form a communicator and grow it to 4 with ranks 2 and 3, which get the id
 * from rank 0 through a file. */
static void grow(int rank, int n, mwUniqueId id, const char *path) {
  (void)n;
  mwComm_t comm = NULL, big;
  mwUniqueId gid;
  char tmp[600];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  if (rank < 2) {
    MWCHECK(mwCommInitRank(&comm, 2, id, rank));
    if (rank == 0) {
      MWCHECK(mwCommGetUniqueId(comm, &gid));
      FILE *f = fopen(tmp, "wb");
      CHECK(f && fwrite(&gid, sizeof gid, 1, f) == 1 && fclose(f) == 0);
      CHECK(rename(tmp, path) == 0);
    }
    MWCHECK(mwCommGrow(comm, 4, rank == 0 ? &gid : NULL, -1, &big, NULL));
  } else {
    FILE *f = NULL;
    for (int tries = 0; !f && tries < 4000; tries++)
      if (!(f = fopen(path, "rb"))) usleep(5000);
    CHECK(f && fread(&gid, sizeof gid, 1, f) == 1);
    fclose(f);
    if (rank == 3) usleep(200 * 1000); /* one newcomer comes after the members wait */
    MWCHECK(mwCommGrow(NULL, 4, &gid, rank, &big, NULL));
  }
  check_shape(big, 4, rank);
  CHECK(sum_of(big, rank + 1) == 10);
  if (comm) CHECK(sum_of(comm, 1) == 2);
  MWCHECK(mwBarrier(big, NULL));
  MWCHECK(mwCommDestroy(big));
  if (comm) MWCHECK(mwCommDestroy(comm));
}

static void test_grow(void) {
  char path[512];
  snprintf(path, sizeof path, "/tmp/mw-c-grow-%d", (int)getpid());
  unlink(path);
  CHECK(run_ranks(4, "grow", path) == 0);
  unlink(path);
  printf("ok - grow from 2 to 4 ranks with two newcomers\n");
}

/* ---- a killed peer ---- */

static void killed(int rank, int n, mwUniqueId id, const char *arg) {
  (void)arg;
  mwEvent_t ev;
  mwComm_t comm;
  mwConfig_t cfg = MW_CONFIG_INITIALIZER;
  cfg.heartbeatIntervalMs = 100;
  cfg.heartbeatTimeoutMs = 1000;
  MWCHECK(mwCommInitRankConfig(&comm, n, id, rank, &cfg));
  MWCHECK(mwBarrier(comm, NULL));
  if (rank == 1) {
    usleep(200 * 1000);
    kill(getpid(), SIGKILL);
  }
  char buf[16];
  double t = now_ms();
  mwResult_t r = mwRecv(buf, sizeof buf, mwChar, 1, comm, NULL);
  double took = now_ms() - t - 200;
  CHECK(r == mwRemoteError);
  CHECK(strstr(mwGetLastError(comm), "rank 1") != NULL);
  printf("   rank 0 saw the kill %.1f ms after it: %s\n", took, mwGetLastError(comm));
  mwResult_t st;
  MWCHECK(mwCommGetAsyncError(comm, &st));
  CHECK(st == mwRemoteError);
  CHECK(mwBarrier(comm, NULL) == mwRemoteError);
  int broken = 0;
  while (mwPollEvent(&ev) == mwSuccess) {
    if (ev.kind == MW_EVENT_BROKEN) {
      broken = 1;
      CHECK(ev.peer == 1);
      CHECK(strstr(ev.cause, "rank 1") != NULL);
    }
  }
  CHECK(broken);
  MWCHECK(mwCommAbort(comm));
}

static void test_killed_peer(void) {
  /* Rank 1 kills itself: rank 0 must exit 0, rank 1 die of SIGKILL. */
  pid_t pids[2];
  spawn_ranks(2, "killed", NULL, pids);
  int s0, s1;
  waitpid(pids[0], &s0, 0);
  waitpid(pids[1], &s1, 0);
  CHECK(WIFEXITED(s0) && WEXITSTATUS(s0) == 0);
  CHECK(WIFSIGNALED(s1) && WTERMSIG(s1) == SIGKILL);
  printf("ok - killed peer: mwRemoteError, async error, broken event\n");
}

const struct role ROLES[] = {
    {"collectives", collectives},
    {"mismatch", mismatch},
    {"nonblocking", nonblocking},
    {"by_address", by_address},
    {"killed", killed},
    {"elastic", elastic},
    {"nonblocking_elastic", nonblocking_elastic},
    {"shrink_killed", shrink_killed},
    {"grow", grow},
    {NULL, NULL},
};

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IONBF, 0);
  if (!realpath(argv[0], SELF)) return 2;
  if (argc == 8 && strcmp(argv[1], "--role") == 0) return rank_main(argv);
  test_version_and_strings();
  test_bad_arguments();
  test_operation_arguments();
  test_collectives();
  test_mismatch();
  test_nonblocking();
  test_address();
  test_group_init();
  test_killed_peer();
  test_elastic();
  test_nonblocking_elastic();
  test_shrink_killed();
  test_grow();
  printf("all C API tests passed\n");
  return 0;
}
