"""``caldera publish`` and ``caldera models list|show|diff|rm``: what they print. Errors are ConfigErrors (the CLI
prints one line and exits 2)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from caldera.config import flatten
from caldera.registry import PROVENANCE, Registry, Version
from caldera.registry.publish import publish


def publish_command(args: argparse.Namespace) -> int:
    """``caldera publish``."""
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    version, digest = publish(args.run, args.name, args.tag, args.registry, formats, args.trust_code,
                              threads=args.threads)  # fmt: skip
    tags = f" (tags: {', '.join(args.tag)})" if args.tag else ""
    print(f"caldera publish: {version.ref}{tags} at {version.path}; content sha256 {digest}", flush=True)
    return 0


def models_command(args: argparse.Namespace) -> int:
    """``caldera models list|show|diff|rm``."""
    reg = Registry.find(args.registry)
    if args.action == "list":
        names = [args.ref] if args.ref else reg.names()
        if args.ref:
            reg.get(args.ref, verify=False)  # an unknown name is an error, not an empty list
        for name in names:
            versions = reg.versions(name)
            latest = versions[-1].number
            print(name)
            for v in versions:
                prov = v.json(PROVENANCE)
                marks = ", ".join([*(["latest"] if v.number == latest else []), *v.tags])
                print(f"  {v.ref:<24} {prov.get('published_at', '?'):<26} {prov.get('published_by', '?'):<12} "
                      f"{marks}")  # fmt: skip
        if not names:
            print(f"no models in {reg.root} yet: caldera publish RUN_DIR --registry {reg.root}")
        return 0
    if args.action == "show":
        version = reg.get(args.ref)
        print((version.path / "README.md").read_text())
        print("## Provenance\n")
        for key, value in version.json(PROVENANCE).items():
            print(f"- {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
        print(f"\n{version.ref} at {version.path}; tags: {', '.join(version.tags) or 'none'}; content sha256 "
              f"{version.content_hash}; {len(version.manifest())} files match the MANIFEST")  # fmt: skip
        return 0
    if args.action == "diff":
        a, b = reg.get(args.ref, verify=False), reg.get(args.other, verify=False)
        for line in diff(a, b):
            print(line)
        return 0
    version, tags = reg.remove(args.ref)
    gone = f"; removed tags {', '.join(tags)}" if tags else ""
    print(f"caldera models rm: removed {version.ref} (the number stays taken){gone}", flush=True)
    return 0


def diff(a: Version, b: Version) -> list[str]:
    """What differs between two versions: config keys, metrics, data fingerprint, content."""
    ca, cb = a.json("model.json"), b.json("model.json")
    lines = [f"--- {a.ref}", f"+++ {b.ref}"]
    fa, fb = flatten(ca.get("config") or {}), flatten(cb.get("config") or {})
    changed = [k for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k) and not k.startswith("run.dir")]
    lines.append("config: identical" if not changed else f"config: {len(changed)} keys differ")
    lines += [f"  {k}: {json.dumps(fa.get(k))} -> {json.dumps(fb.get(k))}" for k in changed]
    ma, mb = ca.get("metrics") or {}, cb.get("metrics") or {}
    lines.append("metrics:")
    for k in sorted(set(ma) | set(mb)):
        va, vb = ma.get(k), mb.get(k)
        delta = f"  ({vb - va:+.3g})" if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else ""
        lines.append(f"  {k}: {_num(va)} -> {_num(vb)}{delta}")
    da, db = [(c.get("data_fingerprint") or {}).get("sha256") for c in (ca, cb)]
    lines.append("data fingerprint: same" if da == db else f"data fingerprint: {da} -> {db}")
    # model.pt, the trained state_dict as training saved it: model.safetensors' header order varies per export
    same = a.manifest().get("model.pt") == b.manifest().get("model.pt")
    lines.append(f"weights: {'same' if same else 'differ'}")
    return lines


def _num(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)
