#!/bin/bash
# Felt downtime of a 1 GiB post-copy at 1gbit+2ms (linkem): CRIU lazy, pageserv (cubic), pageserv (scavenger), pageserv (cubic, push held 300 ms).
cd /work/main
export PAGESERV_CRIU=/opt/pageserv/criu/bin/criu
B="flock -o /tmp/pageserv-e2e.lock ./target/release/pageserv-lab bench --runs 2 --one-thread-workload --sizes 1024 --links 1gbit+2ms --rates 0"
$B --modes criu-lazy,pageserv-lazy --pageserv-src-arg=--congestion=cubic --out /work/notes/s33/felt1g/cubic > /work/notes/s33/felt1g/cubic.log 2>&1
$B --modes pageserv-lazy --pageserv-src-arg=--congestion=scavenger --out /work/notes/s33/felt1g/scavenger > /work/notes/s33/felt1g/scavenger.log 2>&1
$B --modes pageserv-lazy --pageserv-src-arg=--congestion=cubic --pageserv-src-arg=--push-after=300ms --out /work/notes/s33/felt1g/push300 > /work/notes/s33/felt1g/push300.log 2>&1
echo done
