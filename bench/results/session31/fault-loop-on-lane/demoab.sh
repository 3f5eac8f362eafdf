#!/bin/bash
# demoab.sh TAG ROUNDS "BINS" demo-args...
tag=$1; rounds=$2; bins=$3; shift 3
export PAGESERV_CRIU=/opt/pageserv/criu/bin/criu
mkdir -p /work/notes/s31/$tag
for i in $(seq 1 $rounds); do for b in $bins; do
  out=/work/notes/s31/$tag/$b$i
  flock -o /tmp/pageserv-e2e.lock /work/bin$b/pageserv-lab demo "$@" --json $out.json > $out.log 2>&1
  echo "$b$i | felt $(grep -o 'largest heartbeat gap): [0-9.]* ms' $out.log | grep -o '[0-9.]* ms') | $(grep -E '\[dst\]   post-copy' $out.log | tr -s ' ' | cut -d' ' -f4-) | $(grep -E '\[dst\]   faults [0-9]*: latency' $out.log | tr -s ' '| cut -d' ' -f4-12) | src $(grep -E '^  CPU' $out.log | tr -s ' ' | cut -d' ' -f3-11) | dst $(grep -E '\[dst\]   CPU' $out.log | tr -s ' ' | cut -d' ' -f4-12) | $(grep -E 'result:' $out.log | tr -s ' ')"
done; done
