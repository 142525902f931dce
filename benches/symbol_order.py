#!/usr/bin/env python3
# A symbol ordering file for lld from a callgrind profile of the daemon:
# the functions of OBJECT that ran (had cost), the costliest first.
#   valgrind --tool=callgrind --demangle=no --dump-instr=no outpost run ...
#   (callgrind_control -z PID after the warm-up, callgrind_control -d PID later)
#   python3 benches/symbol_order.py callgrind.out.PID.1 outpost > order.txt
# See BENCHMARKS.md, "The agent's RSS and CPU with the uplink on".
import sys, re, collections
path,obj=sys.argv[1],sys.argv[2]
names={}; obnames={}
cur_ob=None; cur_fn=None; cost=collections.Counter(); fn_ob={}
def parse(kind,rest,table):
    m=re.match(r'\((\d+)\)(?:\s+(.*))?',rest)
    if not m: return rest
    i=m.group(1)
    if m.group(2): table[i]=m.group(2)
    return table.get(i)
in_call=False
for line in open(path,errors='replace'):
    line=line.rstrip('\n')
    if line.startswith('ob='):
        cur_ob=parse('ob',line[3:],obnames)
    elif line.startswith('fl=') or line.startswith('fi=') or line.startswith('fe='):
        pass
    elif line.startswith('fn='):
        cur_fn=parse('fn',line[3:],names); fn_ob[cur_fn]=cur_ob; in_call=False
    elif line.startswith('cob='):
        parse('ob',line[4:],obnames)
    elif line.startswith('cfn='):
        parse('fn',line[4:],names)
    elif line.startswith('calls='):
        in_call=True
    elif line and (line[0].isdigit() or line[0] in '+-*'):
        if in_call:
            in_call=False  # inclusive cost line of the call: skip
            continue
        parts=line.split()
        if len(parts)>=2 and cur_fn:
            try: cost[cur_fn]+=int(parts[1])
            except ValueError: pass
out=[f for f,c in cost.most_common() if c>0 and fn_ob.get(f) and obj in fn_ob[f]]
print('\n'.join(out))
print(len(out),'functions', file=sys.stderr)
