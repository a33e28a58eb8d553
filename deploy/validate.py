"""Validate deploy/ offline against the Kubernetes and KServe schemas; exit 1 naming each error.

    python deploy/validate.py [--root DIR] [-k KUBERNETES_VERSION ...]

Every YAML document under the root is checked by its apiVersion and kind:
- Kubernetes kinds against the strict schemas that the kubernetes-validate package ships (built
  from Kubernetes' OpenAPI; unknown fields are errors, and so is a kind it has no schema for);
- a KServe InferenceService against deploy/schemas/inferenceservice-serving-v1beta1.json, then its
  predictor, less the fields KServe adds, as a Kubernetes PodSpec (that is what KServe embeds);
- a KubeRay RayJob against deploy/schemas/rayjob-ray-v1.json, then each pod template (head,
  workers, submitter) as a Kubernetes Pod;
- a Kustomization: every resource it lists exists, and every manifest beside it is listed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

DEPLOY = Path(__file__).resolve().parent
ISVC_SCHEMA = DEPLOY / "schemas" / "inferenceservice-serving-v1beta1.json"
KUBERNETES_VERSIONS = ["1.30.0"]  # the oldest Kubernetes these manifests support
KSERVE_GROUP = "serving.kserve.io/"
RAYJOB_SCHEMA = DEPLOY / "schemas" / "rayjob-ray-v1.json"
RAY_GROUP = "ray.io/"

Doc = dict[str, Any]


def documents(path: Path) -> list[Doc]:
    """The non-empty YAML documents of one file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def located(path: list[object], message: str) -> str:
    """`a.b.0: message`, or the message alone for the whole document."""
    return f"{'.'.join(str(part) for part in path)}: {message}" if path else message


def kubernetes_errors(doc: Doc, versions: list[str]) -> list[tuple[list[object], str]]:
    """(path, message) of each error of one Kubernetes object, against each version's schema."""
    errors: list[tuple[list[object], str]] = []
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append((list(e.path), f"{e.message} (Kubernetes {version})"))
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(([], e.message))
    return errors


def check_kubernetes(doc: Doc, versions: list[str]) -> list[str]:
    return [located(path, message) for path, message in kubernetes_errors(doc, versions)]


def check_inferenceservice(doc: Doc, versions: list[str]) -> list[str]:
    """Errors of a KServe InferenceService: its own fields, then its predictor's PodSpec."""
    schema = json.loads(ISVC_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [located(list(e.absolute_path), e.message) for e in validator.iter_errors(doc)]
    if errors:
        return errors
    kserve_fields = schema["$defs"]["predictor"]["properties"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": doc["metadata"]["name"]},
        "spec": {k: v for k, v in doc["spec"]["predictor"].items() if k not in kserve_fields},
    }
    # Report paths in the InferenceService: the pod's spec.X is its spec.predictor.X.
    return [
        located(["spec", "predictor", *path[1:]] if path else path, message)
        for path, message in kubernetes_errors(pod, versions)
    ]


def check_rayjob(doc: Doc, versions: list[str]) -> list[str]:
    """Errors of a KubeRay RayJob: its own fields, then each pod template as a Kubernetes Pod."""
    validator = jsonschema.Draft202012Validator(json.loads(RAYJOB_SCHEMA.read_text()))
    errors = [located(list(e.absolute_path), e.message) for e in validator.iter_errors(doc)]
    if errors:
        return errors
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec", {})
    templates: list[tuple[list[object], Doc]] = []
    if "headGroupSpec" in cluster:
        templates.append(
            (
                ["spec", "rayClusterSpec", "headGroupSpec", "template"],
                cluster["headGroupSpec"]["template"],
            )
        )
    for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
        templates.append(
            (["spec", "rayClusterSpec", "workerGroupSpecs", i, "template"], group["template"])
        )
    if "submitterPodTemplate" in spec:
        templates.append((["spec", "submitterPodTemplate"], spec["submitterPodTemplate"]))
    for where, template in templates:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": doc["metadata"]["name"], **template.get("metadata", {})},
            "spec": template["spec"],
        }
        errors += [
            located([*where, *path], message) for path, message in kubernetes_errors(pod, versions)
        ]
    return errors


def check_kustomization(path: Path, doc: Doc) -> list[str]:
    """A listed resource that is missing, or a manifest beside the file that is not listed."""
    listed = doc.get("resources", [])
    missing = [name for name in listed if not (path.parent / name).exists()]
    errors = [f"resources: {name} does not exist" for name in missing]
    beside = {p.name for p in path.parent.glob("*.yaml") if p != path}
    errors += [f"resources: {name} is not listed" for name in sorted(beside - set(listed))]
    return errors


def check(path: Path, doc: Doc, versions: list[str]) -> list[str]:
    api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    if kind == "Kustomization":
        return check_kustomization(path, doc)
    if api_version.startswith(KSERVE_GROUP):
        if kind != "InferenceService":
            return [f"no schema for {kind} {api_version} (only InferenceService)"]
        return check_inferenceservice(doc, versions)
    if api_version.startswith(RAY_GROUP):
        if kind != "RayJob":
            return [f"no schema for {kind} {api_version} (only RayJob)"]
        return check_rayjob(doc, versions)
    return check_kubernetes(doc, versions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", type=Path, default=DEPLOY, help=f"directory to check (default: {DEPLOY})"
    )
    parser.add_argument(
        "-k",
        "--kubernetes-version",
        dest="versions",
        action="append",
        help="Kubernetes version to validate against, repeatable "
        f"(default: {', '.join(KUBERNETES_VERSIONS)})",
    )
    args = parser.parse_args(argv)
    versions = args.versions or KUBERNETES_VERSIONS

    paths = sorted(p for p in args.root.rglob("*") if p.suffix in (".yaml", ".yml"))
    if not paths:
        print(f"{args.root}: no YAML files", file=sys.stderr)
        return 1
    failed = checked = 0
    for path in paths:
        try:
            docs = documents(path)
        except yaml.YAMLError as e:
            print(f"{path}: not YAML: {e}", file=sys.stderr)
            failed += 1
            continue
        for doc in docs:
            if not isinstance(doc, dict):
                print(f"{path}: a {type(doc).__name__}, not a mapping", file=sys.stderr)
                failed += 1
                continue
            name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name', '')}".rstrip("/")
            errors = check(path, doc, versions)
            for error in errors:
                print(f"{path}: {name}: {error}", file=sys.stderr)
            failed += bool(errors)
            checked += 1
    if failed:
        print(f"{failed} invalid of {checked} documents under {args.root}", file=sys.stderr)
        return 1
    print(f"{checked} documents under {args.root} valid (Kubernetes {', '.join(versions)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
