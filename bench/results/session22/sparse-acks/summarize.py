import json,statistics as st,re,sys
pre=sys.argv[1]; vs=sys.argv[2]; rounds=int(sys.argv[3])
for link in ['unlimited','1gbit']:
  for v in vs:
    D=[];C1=[];C2=[];P50=[];P99=[];SP=[];ST=[];T=[]
    for r in range(1,rounds+1):
        try: j=json.load(open(f'{pre}-{v}-{r}/results.json'))
        except: continue
        for x in j['runs']:
            if x['cell']['link']!=link: continue
            u=x['usage']
            D.append(x['downtime_ms']-(x['criu_freeze_ms'] or 0));C1.append(u['src']['user_ms']+u['src']['system_ms']);C2.append(u['dst']['user_ms']+u['dst']['system_ms'])
            P50.append(x['fault_p50_us'] or 0);P99.append(x['fault_p99_us'] or 0);SP.append(x['speed_pct'] or 0);T.append(x['total_ms'])
        log=(open(f'{pre}-{v}-{r}.log').read() if __import__('os').path.exists(f'{pre}-{v}-{r}.log') else '')
        m=re.findall(r'ms_after_dump_ready\S*=\x1b\[0m([\d.]+)',log)
        if m: ST.append(float(m[0] if link=='unlimited' else m[-1]))
    if not D: continue
    f=lambda L:f"{st.median(L):.0f} ({min(L):.0f}-{max(L):.0f})"
    print(link,v,'n',len(D),'felt-freeze',f(D),'total',f(T),'cpu src',f(C1),'dst',f(C2),'p50',f(P50),'p99',f(P99),'speed',f"{st.median(SP):.1f}",'start',ST and f"{st.median(ST):.1f}")
