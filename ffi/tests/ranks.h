/* Helpers for the C tests: run a function as N ranks, each a fresh process (the test program
 * runs itself again with the rank's role on its command line, so every rank starts clean and
 * a memory checker sees each one whole). Rank 0 makes the unique id and passes it to the
 * others through pipes. */
#ifndef MW_TEST_RANKS_H
#define MW_TEST_RANKS_H

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "multiworld.h"

#define CHECK(cond)                                                                     \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);         \
      exit(1);                                                                          \
    }                                                                                   \
  } while (0)

#define MWCHECK(call)                                                                   \
  do {                                                                                  \
    mwResult_t r_ = (call);                                                             \
    if (r_ != mwSuccess) {                                                              \
      fprintf(stderr, "%s:%d: %s -> %d (%s): %s\n", __FILE__, __LINE__, #call, r_,      \
              mwGetErrorString(r_), mwGetLastError(NULL));                              \
      exit(1);                                                                          \
    }                                                                                   \
  } while (0)

typedef void (*rank_fn)(int rank, int nranks, mwUniqueId id, const char *arg);

struct role {
  const char *name;
  rank_fn fn;
};

/* Defined by the test program: the functions ranks can run, ending with {NULL, NULL}. */
extern const struct role ROLES[];

/* The test program's own path (set from argv[0] by main: under a memory checker
 * /proc/self/exe would name the checker, not the program). */
static char SELF[4096];

/* Starts `nranks` processes running role `name`; returns their pids in `pids`. */
static void spawn_ranks(int nranks, const char *name, const char *arg, pid_t *pids) {
  int fds[64][2];
  CHECK(nranks <= 64);
  for (int r = 0; r < nranks; r++) CHECK(pipe(fds[r]) == 0);
  for (int r = 0; r < nranks; r++) {
    pids[r] = fork();
    CHECK(pids[r] >= 0);
    if (pids[r] == 0) {
      char rs[16], ns[16], out[512] = "", in[16];
      snprintf(rs, sizeof rs, "%d", r);
      snprintf(ns, sizeof ns, "%d", nranks);
      snprintf(in, sizeof in, "%d", fds[r][0]);
      for (int k = 1; k < nranks && r == 0; k++) {
        size_t l = strlen(out);
        snprintf(out + l, sizeof out - l, "%s%d", k > 1 ? "," : "", fds[k][1]);
      }
      execl(SELF, SELF, "--role", name, rs, ns, in, out[0] ? out : "-", arg ? arg : "-", (char *)NULL);
      _exit(127);
    }
  }
  for (int r = 0; r < nranks; r++) {
    close(fds[r][0]);
    close(fds[r][1]);
  }
}

/* Runs role `name` as `nranks` processes; returns 0 if all exit 0. */
static int run_ranks(int nranks, const char *name, const char *arg) {
  pid_t pids[64];
  spawn_ranks(nranks, name, arg, pids);
  int failed = 0;
  for (int r = 0; r < nranks; r++) {
    int st = 0;
    waitpid(pids[r], &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
      fprintf(stderr, "rank %d of role %s failed (status %d)\n", r, name, st);
      failed = 1;
    }
  }
  return failed;
}

/* In a rank process (argv: --role NAME RANK NRANKS IN_FD OUT_FDS ARG): gets the id, runs. */
static int rank_main(char **argv) {
  const char *name = argv[2];
  int rank = atoi(argv[3]), nranks = atoi(argv[4]), in = atoi(argv[5]);
  const char *arg = strcmp(argv[7], "-") == 0 ? NULL : argv[7];
  mwUniqueId id;
  alarm(60);
  if (rank == 0) {
    MWCHECK(mwGetUniqueId(&id));
    char *outs = strcmp(argv[6], "-") == 0 ? NULL : argv[6];
    for (char *tok = outs ? strtok(outs, ",") : NULL; tok; tok = strtok(NULL, ","))
      CHECK(write(atoi(tok), &id, sizeof id) == (ssize_t)sizeof id);
  } else {
    CHECK(read(in, &id, sizeof id) == (ssize_t)sizeof id);
  }
  for (const struct role *r = ROLES; r->name; r++) {
    if (strcmp(r->name, name) == 0) {
      r->fn(rank, nranks, id, arg);
      return 0;
    }
  }
  fprintf(stderr, "unknown role %s\n", name);
  return 2;
}

#endif
