#!/bin/bash
# pa.sh TAG ROUNDS DELAY: pageserv-lazy 1 GiB reads, push from the restore (P0) against push held DELAY (PD)
tag=$1; rounds=$2; d=$3
export PAGESERV_CRIU=/opt/pageserv/criu/bin/criu
for i in $(seq 1 $rounds); do for m in P0 PD; do
  out=/work/notes/s32/$tag/$m$i; mkdir -p $(dirname $out)
  extra=(); [ $m = PD ] && extra=(--pageserv-src-arg=--push-after=$d)
  flock -o /tmp/pageserv-e2e.lock /work/binY/pageserv-lab bench --runs 1 --one-thread-workload --modes pageserv-lazy --pageserv-src-arg=--congestion=cubic "${extra[@]}" --sizes 1024 --links unlimited --rates ${RATES:-0} --out $out > $out.log 2>&1
  python3 -c "
import json
d=json.load(open('$out/results.json'))
for r in d['runs']: print('$m$i', r['cell']['write_rate'], round(r['downtime_ms'],1), round(r['criu_freeze_ms'],1), round(r['restore_ms'],1), round(r['downtime_ms']-r['criu_freeze_ms']), round(r['fault_p50_us']), round(r['fault_p99_us']), round(r['speed_pct']), round(r['total_ms']))"
done; done
