/*
 * The sandbox ("pause") process of dynvol's local cluster: PID 1 of every pod sandbox.
 *
 * It holds the pod's namespaces open, reaps any orphan that is re-parented to it, and
 * exits on SIGTERM or SIGINT. Built statically by hack/images/build.py, so the image
 * needs no libc.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_stop(int sig) {
  (void)sig;
  _exit(0);
}

static void on_child(int sig) {
  (void)sig;
  /* Reap every exited child, not only one: signals of the same kind coalesce. */
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(int argc, char **argv) {
  struct sigaction stop, child;

  if (argc > 1 && strcmp(argv[1], "-v") == 0) {
    puts("dynvol-pause 1");
    return 0;
  }
  if (getpid() != 1) {
    fprintf(stderr, "dynvol-pause: warning: not running as PID 1\n");
  }
  memset(&stop, 0, sizeof stop);
  stop.sa_handler = on_stop;
  sigaction(SIGINT, &stop, NULL);
  sigaction(SIGTERM, &stop, NULL);

  memset(&child, 0, sizeof child);
  child.sa_handler = on_child;
  child.sa_flags = SA_NOCLDSTOP | SA_RESTART;
  sigaction(SIGCHLD, &child, NULL);

  for (;;) {
    pause();
  }
  return 42; /* not reached */
}
