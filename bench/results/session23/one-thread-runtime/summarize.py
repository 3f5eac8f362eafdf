import json,statistics as st,re,sys,collections
pre=sys.argv[1]; vs=sys.argv[2]; rounds=int(sys.argv[3])
rows=collections.defaultdict(lambda: collections.defaultdict(list))
for v in vs:
  for r in range(1,rounds+1):
    try: j=json.load(open(f'{pre}-{v}-{r}/results.json'))
    except Exception as e: continue
    for x in j['runs']:
        c=x['cell']; key=(c['mode'],c['link'] if isinstance(c['link'],str) else json.dumps(c['link'])[:30],c.get('dirty_pages_per_ms',c.get('rate')))
        u=x['usage']; d=rows[key][v]
        d.append(dict(felt=x['downtime_ms'], ff=x['downtime_ms']-(x['criu_freeze_ms'] or 0), total=x['total_ms'],
            src=u['src']['user_ms']+u['src']['system_ms'], dst=u['dst']['user_ms']+u['dst']['system_ms'],
            rss=u['dst']['max_rss_bytes']/2**20, p50=x['fault_p50_us'] or 0, p99=x['fault_p99_us'] or 0, speed=x['speed_pct'] or 0, ok=x['verified']))
f=lambda L:f"{st.median(L):.0f} ({min(L):.0f}-{max(L):.0f})"
for key in sorted(rows):
  for v in vs:
    d=rows[key][v]
    if not d: continue
    g=lambda k:[e[k] for e in d]
    print(key[0][9:],key[1][:12],v,'n',len(d),'ok',sum(g('ok')),'felt',f(g('felt')),'felt-frz',f(g('ff')),'total',f(g('total')),'cpu',f(g('src')),'/',f(g('dst')),'p50',f(g('p50')),'p99',f(g('p99')),'spd',f"{st.median(g('speed')):.1f}",'rss',f"{max(g('rss')):.0f}")
