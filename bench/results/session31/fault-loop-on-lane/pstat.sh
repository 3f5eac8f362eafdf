#!/bin/bash
# pstat.sh OUT DELAY SECS: waits for criu restore --lazy-pages, sleeps DELAY, then perf stat per thread of src and dst for SECS
out=$1; delay=${2:-0.5}; secs=${3:-2}
for i in $(seq 1 24000); do
  r=$(pgrep -f "criu.*restore.*lazy" | head -1)
  [ -n "$r" ] && break; sleep 0.005
done
dpid=$(pgrep -f "pageserv dst" | while read p; do [ "$(cat /proc/$p/comm)" = pageserv ] && echo $p; done | head -1)
spid=$(pgrep -f "pageserv src" | while read p; do [ "$(cat /proc/$p/comm)" = pageserv ] && echo $p; done | head -1)
sleep $delay
echo "dst $dpid src $spid" > $out
ps -L -o tid,comm -p $dpid,$spid >> $out
perf stat --per-thread -e task-clock,context-switches,syscalls:sys_enter_ioctl,syscalls:sys_enter_sendmsg,syscalls:sys_enter_sendmmsg,syscalls:sys_enter_recvmsg,syscalls:sys_enter_recvmmsg,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_write,syscalls:sys_enter_process_vm_readv,syscalls:sys_enter_futex -p $dpid,$spid -- sleep $secs >> $out 2>&1
