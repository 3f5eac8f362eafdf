#!/bin/bash
# ab.sh TAG ROUNDS "BINS" [extra bench args]: pageserv-lazy 1 GiB alternating (LINK, SIZE, RATE from the environment; one-gbit/ ran with LINK=1gbit); per-thread perf stat in a 2 s window 0.5 s after the restore
tag=$1; rounds=$2; bins=$3; shift 3
export PAGESERV_CRIU=/opt/pageserv/criu/bin/criu
for i in $(seq 1 $rounds); do for b in $bins; do
  out=/work/notes/s31/$tag/$b$i; mkdir -p $(dirname $out)
  /work/notes/s31/pstat.sh $out.pstat 0.5 2 & w=$!
  flock -o /tmp/pageserv-e2e.lock /work/bin$b/pageserv-lab bench --runs 1 --one-thread-workload --modes pageserv-lazy --pageserv-src-arg=--congestion=cubic --sizes ${SIZE:-1024} --links ${LINK:-unlimited} --rates ${RATE:-0} "$@" --out $out > $out.log 2>&1
  wait $w
  srcl=$(grep -E "ps-fault-lane" $out.pstat | grep task-clock | awk '{print $1, $2}' | tr '\n' ' ')
  sends=$(grep -E "sys_enter_sendmsg" $out.pstat | grep ps-fault-lane | awk '{print $1, $2}' | tr '\n' ' ')
  preads=$(grep -E "sys_enter_pread64|sys_enter_read " $out.pstat | head -0)
  row=$(grep -A3 '^| mode' $out/results.md | grep pageserv-lazy | head -1 | cut -d'|' -f7,12,13,14,15)
  echo "$b$i | $(grep -E '\[dst\]   post-copy' $out.log | tr -s ' ' | cut -d' ' -f4-) | $(grep -E 'faults [0-9]*: latency' $out.log | tr -s ' '| cut -d' ' -f3-12) | srcCPU $(grep -E '^  CPU' $out.log | tr -s ' ' | cut -d' ' -f3-11) | felt,p50,p99,degraded,speed $row | lanes $srcl | sendmsg $sends"
done; done
