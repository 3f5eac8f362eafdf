import sys,re
for f in sys.argv[1:]:
    L=open(f).read().splitlines()
    d,s=L[0].split()[1],L[0].split()[3]
    # ps -L -o tid,comm -p dst,src: lines; need pid of each tid: read /proc not possible now; use order: ps sorts by pid; dst threads first if dst<src
    tids={}
    cur=None
    rows=[l.split() for l in L[2:] if re.match(r'^\s*\d+\s',l)]
    # rows until perf output: tid comm
    owner={}
    for r in rows:
        if len(r)!=2: break
        t,c=r
        if t==d: cur='dst'
        if t==s: cur='src'
        owner[t]=(cur,c)
    val={}
    for l in L:
        m=re.match(r'\s*(\S+)-(\d+)\s+([\d,.]+)\s+(msec )?(\S+)',l)
        if m and m.group(2) in owner:
            side,c=owner[m.group(2)]
            val[(side,c,m.group(5))]=float(m.group(3).replace(',',''))
    sl=val.get(('src','ps-fault-lane','task-clock'),0); ss=val.get(('src','ps-fault-lane','syscalls:sys_enter_sendmsg'),1)
    dl=val.get(('dst','ps-fault-lane','task-clock'),0); ds=val.get(('dst','ps-fault-lane','syscalls:sys_enter_sendmsg'),1)
    ul=val.get(('dst','uffd-loop','task-clock'),0)
    print(f"{f.split('/')[-1]}: faults~{ds:.0f} src lane {sl:.0f} ms ({sl*1000/ss:.0f} us/send), dst lane {dl:.0f} ms ({dl*1000/ds:.0f} us/fault), uffd-loop {ul:.0f} ms ({ul*1000/ds:.0f} us/fault); src total per fault {sl*1000/ds:.0f} us")
