#!/bin/bash
# ab.sh TAG ROUNDS [extra bench args]: pageserv-lazy, the same binary (/work/binY) with the early
# restore (E) and with --late-restore (L), alternating; SIZE, RATES, LINK from the environment.
tag=$1; rounds=$2; shift 2
export PAGESERV_CRIU=/opt/pageserv/criu/bin/criu
for i in $(seq 1 $rounds); do for m in E L; do
  out=/work/notes/s32/$tag/$m$i; mkdir -p $(dirname $out)
  extra=(); [ $m = L ] && extra=(--pageserv-dst-arg=--late-restore)
  flock -o /tmp/pageserv-e2e.lock /work/binY/pageserv-lab bench --runs 1 --one-thread-workload --modes pageserv-lazy --pageserv-src-arg=--congestion=cubic --sizes ${SIZE:-1024} --links ${LINK:-unlimited} --rates ${RATES:-0,100} "${extra[@]}" "$@" --out $out > $out.log 2>&1
  grep -A6 '^| mode' $out/results.md | grep pageserv-lazy | cut -d'|' -f2,5,7,8,9,13,14,16 | sed "s/^/$m$i |/"
done; done
