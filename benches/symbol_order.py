#!/usr/bin/env python3
"""The hot-code list (agent/hot-code.txt) from a callgrind profile of the daemon.

Writes the functions of OBJECT that ran (had cost), the costliest first, as
section-name patterns that hold in every build of outpost: Rust symbol names
carry hashes of the crate's build settings (target, features, profile), so
the hash, the crate disambiguators and the back-references of v0 names, and
the clone suffixes the compilers add (`.llvm.N`, `.constprop.0`, `.1224`)
become `*`. agent/build.rs turns the list into a linker script that lays
those functions out first (BENCHMARKS.md, "Hot code first").

  valgrind --tool=callgrind --demangle=no --dump-instr=no outpost run ...
  (callgrind_control -z PID after the warm-up, callgrind_control -d PID later)
  python3 benches/symbol_order.py callgrind.out.PID.1 outpost > agent/hot-code.txt

`--names FILE` reads symbol names, one a line, instead of a profile.
"""
import collections
import re
import sys

HEADER = """\
# Functions the daemon runs in its steady state, the busiest first: agent/build.rs
# lays them out at the start of the binary's code (BENCHMARKS.md, "Hot code
# first"). Section-name patterns without build hashes, written by
# benches/symbol_order.py from a callgrind profile; `*` matches any text.
"""

LEGACY_HASH = re.compile(r"17h[0-9a-f]{16}E.*$")
# v0: crate disambiguators (Cs<base62>_) and back-references (B<base62>_)
# shift with the hashes; `*` covers both.
CRATE = re.compile(r"Cs[0-9A-Za-z]*_")
BACKREF = re.compile(r"B[0-9A-Za-z]*_")


def pattern(symbol):
    """A glob over symbol names that matches `symbol` in any build."""
    symbol = re.sub(r"'\d+$", "", symbol)  # callgrind's recursion marker
    if symbol.startswith("_ZN") and LEGACY_HASH.search(symbol):
        return LEGACY_HASH.sub("17h*", symbol)
    base = symbol.split(".")[0]
    if base.startswith("_R"):
        base = CRATE.sub("Cs*_", base)
        return BACKREF.sub("B*_", base) + "*"
    # C: the name itself, or a compiler's clone of it (name.constprop.0, ...)
    return base


def from_profile(path, obj):
    names, obnames = {}, {}
    cur_ob = cur_fn = None
    cost = collections.Counter()
    fn_ob = {}

    def parse(rest, table):
        m = re.match(r"\((\d+)\)(?:\s+(.*))?", rest)
        if not m:
            return rest
        if m.group(2):
            table[m.group(1)] = m.group(2)
        return table.get(m.group(1))

    in_call = False
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        if line.startswith("ob="):
            cur_ob = parse(line[3:], obnames)
        elif line.startswith("fn="):
            cur_fn = parse(line[3:], names)
            fn_ob[cur_fn] = cur_ob
            in_call = False
        elif line.startswith("cob="):
            parse(line[4:], obnames)
        elif line.startswith("cfn="):
            parse(line[4:], names)
        elif line.startswith("calls="):
            in_call = True
        elif line and (line[0].isdigit() or line[0] in "+-*"):
            if in_call:  # the inclusive cost line of a call
                in_call = False
                continue
            parts = line.split()
            if len(parts) >= 2 and cur_fn:
                try:
                    cost[cur_fn] += int(parts[1])
                except ValueError:
                    pass
    return [f for f, c in cost.most_common() if c > 0 and fn_ob.get(f) and obj in fn_ob[f]]


def main(argv):
    if len(argv) == 3 and argv[1] == "--names":
        symbols = [s.strip() for s in open(argv[2]) if s.strip() and not s.startswith("#")]
    elif len(argv) == 3:
        symbols = from_profile(argv[1], argv[2])
    else:
        sys.exit(__doc__)
    seen, out = set(), []
    for s in symbols:
        p = pattern(s)
        if p not in seen:
            seen.add(p)
            out.append(p)
    sys.stdout.write(HEADER + "\n".join(out) + "\n")
    print(f"{len(symbols)} functions, {len(out)} patterns", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv)
