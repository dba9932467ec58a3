"""python -m l2l_zoo.zoo {list,show,check,build,export}: the pretrained zoo from the command line
(see ``l2l_zoo.zoo``)."""
from __future__ import annotations

import json
import os
import sys

from ..cli import ArgumentParser, UsageError, run_main
from . import ENTRIES, WEIGHTS_DIR, ZooError, available, build, check, entry, provenance_from_results, write_weights


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m l2l_zoo.zoo", description="The pretrained zoo of learned optimizers.")
    sub = p.add_subparsers(dest="cmd", metavar="{list,show,check,build,export}")
    sub.add_parser("list", help="the entries: name, kind, optimizer, recorded numbers")
    s = sub.add_parser("show", help="one entry in full (JSON)")
    s.add_argument("name", help="zoo entry name (see list)")
    c = sub.add_parser("check", help="re-measure a shipped entry's recorded number from its weights (real data)")
    c.add_argument("name", help="zoo entry name (see list)")
    c.add_argument("--data-dir", default=None, help="data folder (default: $L2L_ZOO_DATA)")
    c.add_argument("--device", default="cpu", help="cpu or cuda")
    b = sub.add_parser("build", help="meta-train a shipped entry again with its recorded command and compare")
    b.add_argument("name", help="zoo entry name (see list)")
    b.add_argument("--out", required=True, help="output folder of the build (the command's --out)")
    b.add_argument("--resume", action="store_true", help="continue a killed build in --out")
    e = sub.add_parser("export", help="maintainers: write a zoo weight file from a saved optimizer and the "
                                      "mnist_mlp.py results that measured it")
    e.add_argument("optimizer", help="optimizer.pt written by l2l_zoo.save (e.g. by mnist_mlp.py)")
    e.add_argument("out", help="weight file to write (l2l_zoo/zoo/weights/<name>.json)")
    e.add_argument("--results", required=True, help="comma list of results.json files that measured it")
    e.add_argument("--label", required=True, help="the run label in those results, e.g. simple+smooth")
    a = p.parse_args(argv)
    if a.cmd is None:
        raise UsageError("a command is required: one of list, show, check, build, export")
    if a.cmd in ("show", "check", "build"):
        try:
            entry(a.name)
        except ZooError as err:
            raise UsageError(str(err)) from None
    if a.cmd == "list":
        for n in available():
            en = entry(n)
            nums = ", ".join(f"{k} {_fmt(v)}" for k, v in en.recorded.items())
            print(f"{n:<26} {en.kind:<8} {en.optimizer:<8} {en.summary[:70]}{'…' if len(en.summary) > 70 else ''}")
            if nums:
                print(f"{'':<26} recorded: {nums}")
        missing = [n for n in ENTRIES if n not in available()]
        if missing:
            print(f"(not shipped in this checkout: {missing})")
    elif a.cmd == "show":
        print(json.dumps(entry(a.name).to_dict(), indent=1))
    elif a.cmd == "check":
        r = check(a.name, data_dir=a.data_dir, device=a.device, progress=True)
        print(f"{r['name']}: {r['metric']}: measured {r['measured']:.6g}, recorded {r['recorded']:.6g} "
              f"(relative difference {r['rel_diff']:.2e}, tolerance {r['rtol']:g}; {r['threads']} CPU threads): "
              f"{'OK' if r['ok'] else 'DIFFERENT'}")
        return 0 if r["ok"] else 1
    elif a.cmd == "build":
        r = build(a.name, a.out, resume=a.resume)
        print(json.dumps(r, indent=1))
    elif a.cmd == "export":
        import l2l_zoo
        if not os.path.isfile(a.optimizer):
            raise UsageError(f"no such optimizer file {a.optimizer!r}")
        prov = provenance_from_results(a.optimizer, [f for f in a.results.split(",") if f], a.label)
        digest = write_weights(l2l_zoo.load(a.optimizer), a.out, **prov)
        print(f"wrote {a.out} (SHA-256 {digest[:16]}…); recorded {prov['recorded']}")
        if os.path.dirname(os.path.abspath(a.out)) != str(WEIGHTS_DIR):
            print(f"(the package reads weight files from {WEIGHTS_DIR})")
    return 0


if __name__ == "__main__":
    sys.argv[0] = "l2l_zoo.zoo"
    run_main(main)
