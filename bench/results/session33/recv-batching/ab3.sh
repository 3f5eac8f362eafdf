#!/bin/bash
# A/B of receive batching on the lazy post-copy at 1gbit+2ms (linkem): --no-recv-batching on both services (b0) against the default (b1), taking turns.
cd /work/main
export PAGESERV_CRIU=/opt/pageserv/criu/bin/criu
for i in 1 2 3; do
  for b in 1 0; do
    extra=(); [ $b = 0 ] && extra=(--pageserv-src-arg=--no-recv-batching --pageserv-dst-arg=--no-recv-batching)
    flock -o /tmp/pageserv-e2e.lock ./target/release/pageserv-lab bench --runs 1 --one-thread-workload \
      --modes pageserv-lazy --pageserv-src-arg=--congestion=cubic "${extra[@]}" --sizes 1024 \
      --links 1gbit+2ms --rates 0 --out /work/notes/s33/ab3/b$b-r$i > /work/notes/s33/ab3/b$b-r$i.log 2>&1
  done
done
echo done
