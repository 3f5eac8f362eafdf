import json,statistics as st,sys,collections,os
pre=sys.argv[1]; vs=sys.argv[2]; rounds=int(sys.argv[3])
rows=collections.defaultdict(lambda: collections.defaultdict(list))
for v in vs:
  for r in range(1,rounds+1):
    p=f'{pre}/{v}{r}/results.json'
    if not os.path.exists(p): continue
    j=json.load(open(p))
    for x in j['runs']:
        c=x['cell']; key=(c['mode'],c['link'] if isinstance(c['link'],str) else json.dumps(c['link'])[:30],c.get('write_rate'))
        u=x['usage']; w=u['wall_ms']
        rows[key][v].append(dict(felt=x['downtime_ms'], total=x['total_ms'],
            src=u['src']['user_ms']+u['src']['system_ms'], dst=u['dst']['user_ms']+u['dst']['system_ms'],
            srcp=100*(u['src']['user_ms']+u['src']['system_ms'])/w, dstp=100*(u['dst']['user_ms']+u['dst']['system_ms'])/w,
            p50=x['fault_p50_us'] or 0, p99=x['fault_p99_us'] or 0, speed=x['speed_pct'] or 0, ok=x['verified']))
f=lambda L:f"{st.median(L):.0f} ({min(L):.0f}-{max(L):.0f})"
for key in sorted(rows, key=str):
  for v in vs:
    d=rows[key][v]
    if not d: continue
    g=lambda k:[e[k] for e in d]
    print(key[0][9:],str(key[1])[:12],key[2],v,'n',len(d),'ok',sum(g('ok')),'felt',f(g('felt')),'total',f(g('total')),'cpu-ms',f(g('src')),'/',f(g('dst')),'cpu%',f(g('srcp')),'/',f(g('dstp')),'p50',f(g('p50')),'p99',f(g('p99')),'spd',f"{st.median(g('speed')):.1f}")
