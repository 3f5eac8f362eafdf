#!/bin/bash
# A/B of receive batching: PAGESERV_RECV_BATCH=0 (off) against the default (on), same binary, taking turns.
cd /work/main
export PAGESERV_CRIU=/opt/pageserv/criu/bin/criu
for i in 1 2; do
  for b in 1 0; do
    PAGESERV_RECV_BATCH=$b flock -o /tmp/pageserv-e2e.lock ./target/release/pageserv-lab bench --runs 1 --one-thread-workload \
      --modes pageserv-lazy,pageserv-stop-and-copy --pageserv-src-arg=--congestion=cubic --sizes 1024 \
      --links 1gbit+2ms,unlimited --rates 0 --out /work/notes/s33/ab/b$b-r$i > /work/notes/s33/ab/b$b-r$i.log 2>&1
  done
done
echo done
