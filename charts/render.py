"""Renders charts/istio-cni with Helm 4's engine (helm-python-sdk, Helm's Go SDK) as
`helm template istio-cni charts/istio-cni -n istio-system` would, and writes every object
as one JSON list: `python charts/render.py OUT.json [VALUES.yaml]`. The DaemonSet end-to-end
test (`make e2e`) runs the pod template it finds there."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parent / "istio-cni"


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    values = yaml.safe_load(Path(sys.argv[2]).read_text()) if len(sys.argv) == 3 else {}
    out = helm.Chart.load(str(CHART)).render(values or {}, name="istio-cni", namespace="istio-system", is_install=True)
    objs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        objs.extend(d for d in yaml.safe_load_all(text) if d)
    Path(sys.argv[1]).write_text(json.dumps(objs, indent=1))
    print(f"rendered {len(objs)} objects: {', '.join(o['kind'] for o in objs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
