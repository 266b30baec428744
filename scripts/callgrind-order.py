#!/usr/bin/env python3
"""Reads callgrind profiles of ucd and prints a symbol ordering file for the
linker: every function of ucd's binary that ran, the most run first.

usage: callgrind-order.py BINARY_PATH PROFILE... > agent/ucd.order

The profiles must be written with --compress-strings=no and
--compress-pos=no, and --demangle=no, so that each function is named by its
symbol as the linker knows it.
"""
import sys
from collections import defaultdict


def costs(path, binary, into):
    ob = fn = None
    after_call = False
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("ob="):
                ob = line[3:].rstrip("\n")
            elif line.startswith("fn="):
                fn = line[3:].rstrip("\n")
                if ob == binary:
                    into[fn] += 0
            elif line.startswith("calls="):
                after_call = True
                continue
            elif line[:1].isdigit() or line[:1] in "+-*":
                # A cost line: position, then Ir. The line after calls= is
                # the callee's inclusive cost, not this function's own.
                if not after_call and ob == binary and fn is not None:
                    parts = line.split()
                    if len(parts) >= 2 and parts[1].isdigit():
                        into[fn] += int(parts[1])
            after_call = False


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    binary, profiles = sys.argv[1], sys.argv[2:]
    total = defaultdict(int)
    for p in profiles:
        costs(p, binary, total)
    names = [
        n for n in total if not n.startswith("0x") and not n.startswith("(")
    ]
    names.sort(key=lambda n: (-total[n], n))
    for n in names:
        print(n)


if __name__ == "__main__":
    main()
