/* All-reduce across forked processes with the multiworld C API.
 *
 *   cc -O2 -Iffi/include ffi/examples/allreduce.c -Ltarget/release -lmultiworld -o allreduce
 *   LD_LIBRARY_PATH=target/release ./allreduce 4
 *
 * Each rank is a process. Rank 0 makes the unique id and hands it to the others through a pipe
 * (any channel works: a file, an environment variable, a key-value store); every rank joins,
 * all-reduces a vector and checks the sum. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "multiworld.h"

#define N 1000000

static int rank_main(int rank, int nranks, mwUniqueId id) {
  mwComm_t comm;
  mwResult_t r = mwCommInitRank(&comm, nranks, id, rank);
  if (r != mwSuccess) {
    fprintf(stderr, "rank %d: init: %s: %s\n", rank, mwGetErrorString(r), mwGetLastError(NULL));
    return 1;
  }
  float *send = malloc(N * sizeof(float)), *recv = malloc(N * sizeof(float));
  for (int i = 0; i < N; i++) send[i] = (float)(rank + 1);
  /* stream NULL: host memory, the call returns when the result is in recv. */
  r = mwAllReduce(send, recv, N, mwFloat, mwSum, comm, NULL);
  if (r != mwSuccess) {
    fprintf(stderr, "rank %d: all-reduce: %s: %s\n", rank, mwGetErrorString(r), mwGetLastError(comm));
    return 1;
  }
  float want = (float)nranks * (nranks + 1) / 2;
  int wrong = 0;
  for (int i = 0; i < N; i++) wrong += recv[i] != want;
  printf("rank %d of %d: all-reduce of %d floats: %s (each %.0f)\n", rank, nranks, N,
         wrong ? "WRONG" : "correct", recv[0]);
  mwCommDestroy(comm);
  free(send);
  free(recv);
  return wrong != 0;
}

int main(int argc, char **argv) {
  int nranks = argc > 1 ? atoi(argv[1]) : 3;
  if (nranks < 1 || nranks > 64) return 2;
  int fds[64][2];
  for (int r = 1; r < nranks; r++)
    if (pipe(fds[r])) return 2;
  for (int r = 0; r < nranks; r++) {
    if (fork() == 0) {
      mwUniqueId id;
      if (r == 0) {
        if (mwGetUniqueId(&id) != mwSuccess) return 1;
        for (int k = 1; k < nranks; k++)
          if (write(fds[k][1], &id, sizeof id) != (ssize_t)sizeof id) return 1;
      } else if (read(fds[r][0], &id, sizeof id) != (ssize_t)sizeof id) {
        return 1;
      }
      return rank_main(r, nranks, id);
    }
  }
  int failed = 0, st;
  while (wait(&st) > 0) failed |= !WIFEXITED(st) || WEXITSTATUS(st) != 0;
  return failed;
}
