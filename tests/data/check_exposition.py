#!/usr/bin/env python3
"""Checks a Prometheus text exposition (read from stdin) as a scraper would.

Parses it with the Prometheus project's own Python parser, then applies the
rules that parser is lenient about: every family has one HELP and one TYPE
line before its samples, no family is declared twice, every sample belongs
to the family declared above it (a counter's samples end in _total, a
summary's in _sum or _count), and no sample repeats a name and label set.
Prints "FAMILIES SAMPLES" on success; exits 1 with the reason otherwise.
"""
import sys

from prometheus_client.parser import text_string_to_metric_families

SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "summary": ("_sum", "_count", ""),
    "histogram": ("_bucket", "_sum", "_count"),
    "untyped": ("",),
}


def fail(reason):
    print(reason, file=sys.stderr)
    sys.exit(1)


def main():
    text = sys.stdin.read()
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as error:
        fail(f"the Prometheus parser refused it: {error}")
    declared = {}
    current = None
    seen = set()
    samples = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            if name in declared:
                fail(f"line {number}: family {name} declared twice")
            declared[name] = None
            current = name
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            if name != current or declared.get(name) is not None:
                fail(f"line {number}: TYPE for {name} without its HELP just above")
            if kind not in SUFFIXES:
                fail(f"line {number}: unknown type {kind}")
            declared[name] = kind
            continue
        if line.startswith("#"):
            continue
        series = line.rsplit(" ", 1)[0]
        sample = series.split("{", 1)[0]
        if current is None or declared[current] is None:
            fail(f"line {number}: sample {sample} before any HELP and TYPE")
        kind = declared[current]
        base = current[: -len("_total")] if kind == "counter" else current
        if not any(sample == base + suffix for suffix in SUFFIXES[kind]):
            fail(f"line {number}: sample {sample} does not belong to {kind} {current}")
        if series in seen:
            fail(f"line {number}: {series} appears twice")
        seen.add(series)
        samples += 1
    parsed = sum(len(f.samples) for f in families)
    if parsed != samples:
        fail(f"the parser read {parsed} samples, the lines hold {samples}")
    print(len(declared), samples)


main()
