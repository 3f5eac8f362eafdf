import json,sys
for f in sys.argv[1:]:
    d=json.load(open(f))
    for r in d['runs']:
        c=r['cell']; u=r['usage']; w=u['wall_ms']
        pc=lambda s: 100*(u[s]['user_ms']+u[s]['system_ms'])/w
        print(f.split('/')[-2], c['mode'][9:], c['link'], 'rate',c.get('write_rate'), 'felt %.0f'%r['downtime_ms'], 'total %.0f'%r['total_ms'], 'p50',r['fault_p50_us'],'p99',r['fault_p99_us'],'speed %s'%(r['speed_pct'] and round(r['speed_pct'],1)), 'src %.1f%% dst %.1f%%'%(pc('src'),pc('dst')), 'dstRSS %.1f'%(u['dst']['max_rss_bytes']/2**20))
