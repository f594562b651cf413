"""`make chart`: lint charts/istio-cni with Helm 4's engine (strict, every profile) and
package it into target/chart/. Uses helm-python-sdk (Helm's Go SDK), so no helm binary is
needed."""

from __future__ import annotations

import sys
from pathlib import Path

import helm_python as helm

CHART = Path(__file__).resolve().parent / "istio-cni"


def main() -> int:
    dest = Path(sys.argv[1] if len(sys.argv) > 1 else "target/chart")
    cases = {"default": {}}
    for p in sorted((CHART / "files").glob("profile-*.yaml")):
        cases[p.stem] = {"profile": p.stem.removeprefix("profile-")}
    for p in sorted((CHART / "files").glob("platform-*.yaml")):
        cases[p.stem] = {"platform": p.stem.removeprefix("platform-")}
    failed = False
    for name, values in cases.items():
        report = helm.lint(str(CHART), values, strict=True, namespace="istio-system")
        for m in report["messages"]:
            level = {1: "INFO", 2: "WARNING", 3: "ERROR"}.get(m["severity"], "UNKNOWN")
            print(f"[{level}] {name}: {m['path']}: {m['error']}")
            failed |= m["severity"] >= 2
        failed |= bool(report["errors"])
    if failed:
        print("lint failed")
        return 1
    dest.mkdir(parents=True, exist_ok=True)
    print(f"linted ({', '.join(cases)}); packaged {helm.package(str(CHART), destination=str(dest))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
