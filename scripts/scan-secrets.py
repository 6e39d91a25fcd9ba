#!/usr/bin/env python3
"""Planted-secret scan (issue #14 §6): fails if a secret the tests configured shows up in a log.

Every test that configures a secret (AWS keys and external ids, Vault tokens and AppRole
secret ids, Azure client secrets, PKCS#11 PINs, service-account keys) uses a value containing
PLANTED-SECRET-, or, where a peer dictates the secret (a token Vault issued, an RSA key),
registers the value in the registry directory: one file per secret, its whole content the
value. This scan looks for the marker and every registered value in every file under the
given paths (the registry itself excepted) and names each hit's file and line.

  scan-secrets.py [--registry DIR] [--require GLOB]... PATH...
  scan-secrets.py --self-test

--require GLOB (relative to a scanned directory) must match at least one file: the scan proves
nothing if the logs it should read were never written. Exit status: 0 clean, 1 hits or a
missing required log, 2 usage.
"""

import argparse
import fnmatch
import os
import sys
import tempfile

MARKER = b"PLANTED-SECRET-"
# A registered value shorter than this could match by chance; the tests never register one.
MIN_REGISTERED = 8
MAX_HITS_SHOWN = 20


def load_registry(registry):
    """The registered values as (label, bytes): the label is the file name, never the value."""
    values = []
    if not registry or not os.path.isdir(registry):
        return values
    for name in sorted(os.listdir(registry)):
        with open(os.path.join(registry, name), "rb") as f:
            value = f.read().strip()
        if len(value) < MIN_REGISTERED:
            print(f"scan-secrets: ignoring registered secret {name}: shorter than {MIN_REGISTERED} bytes", file=sys.stderr)
            continue
        values.append((name, value))
    return values


def files_under(paths, skip):
    for path in paths:
        if os.path.isfile(path):
            yield path, os.path.dirname(path)
            continue
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) != skip)
            for name in sorted(names):
                yield os.path.join(root, name), path


def scan(paths, registry=None, require=()):
    """Returns (hits, missing, files scanned): hits are (path, line, what)."""
    needles = [("the marker " + MARKER.decode(), MARKER)]
    needles += [(f"registered secret {label}", value) for label, value in load_registry(registry)]
    skip = os.path.realpath(registry) if registry else None
    hits, seen, scanned = [], set(), 0
    for path, base in files_under(paths, skip):
        seen.add(os.path.relpath(path, base))
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            print(f"scan-secrets: cannot read {path}: {e}", file=sys.stderr)
            continue
        scanned += 1
        for what, needle in needles:
            start = data.find(needle)
            while start != -1:
                hits.append((path, data.count(b"\n", 0, start) + 1, what))
                start = data.find(needle, start + 1)
    missing = [g for g in require if not any(fnmatch.fnmatch(p, g) for p in seen)]
    return hits, missing, scanned


def report(hits, missing, scanned):
    for path, line, what in hits[:MAX_HITS_SHOWN]:
        print(f"{path}:{line}: {what}")
    if len(hits) > MAX_HITS_SHOWN:
        print(f"... and {len(hits) - MAX_HITS_SHOWN} more")
    for glob in missing:
        print(f"scan-secrets: no log matches {glob}: the tests did not write it where the scan reads")
    verdict = "FAILED" if hits or missing else "clean"
    print(f"scan-secrets: {scanned} files scanned, {len(hits)} planted secrets found: {verdict}")
    return 1 if hits or missing else 0


def self_test():
    """Plants hits and checks that the scan finds exactly them (and fails on them)."""
    with tempfile.TemporaryDirectory() as d:
        logs = os.path.join(d, "logs")
        registry = os.path.join(logs, "planted-secrets")
        os.makedirs(os.path.join(logs, "go"))
        os.makedirs(registry)
        with open(os.path.join(registry, "vault-token"), "w") as f:
            f.write("hvs.generated-by-the-peer\n")
        with open(os.path.join(registry, "short"), "w") as f:
            f.write("1234\n")
        with open(os.path.join(logs, "go", "clean.log"), "w") as f:
            f.write("nothing here\nPLANTED-SECRET (no dash)\n1234 is too short to register\n")
        with open(os.path.join(logs, "go", "plugin.log"), "w") as f:
            f.write("line one\nline two\nconfigured secret_access_key=PLANTED-SECRET-aws-secret\n")
        with open(os.path.join(logs, "cli.log"), "wb") as f:
            f.write(b"\x00binary\nauth: hvs.generated-by-the-peer and again hvs.generated-by-the-peer\n")
        hits, missing, scanned = scan([logs], registry, ["go/*.log", "rust/*.log"])
        expected = [
            (os.path.join(logs, "cli.log"), 2, "registered secret vault-token"),
            (os.path.join(logs, "cli.log"), 2, "registered secret vault-token"),
            (os.path.join(logs, "go", "plugin.log"), 3, "the marker PLANTED-SECRET-"),
        ]
        problems = []
        if sorted(hits) != sorted(expected):
            problems.append(f"hits {hits}, expected {expected}")
        if missing != ["rust/*.log"]:
            problems.append(f"missing {missing}, expected ['rust/*.log']")
        if scanned != 3:
            problems.append(f"{scanned} files scanned (the registry must be skipped), expected 3")
        clean, _, _ = scan([os.path.join(logs, "go", "clean.log")], registry)
        if clean:
            problems.append(f"hits in the clean log: {clean}")
        if report(hits, missing, scanned) != 1:
            problems.append("a scan with hits did not fail")
    if problems:
        print("scan-secrets self-test FAILED: " + "; ".join(problems))
        return 1
    print("scan-secrets self-test: the planted hits were found and failed the scan")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", help="directory of registered (peer-generated) secrets, one per file")
    parser.add_argument("--require", action="append", default=[], metavar="GLOB")
    parser.add_argument("--self-test", action="store_true")
    parser.add_argument("paths", nargs="*")
    args = parser.parse_args()
    if args.self_test:
        return self_test()
    if not args.paths:
        parser.error("give the logs to scan")
    return report(*scan(args.paths, args.registry, args.require))


if __name__ == "__main__":
    sys.exit(main())
