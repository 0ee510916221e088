"""deploy/mpijob.yaml, checked offline: its fields against schemas, and against what the image expects.

Three checks, each shown to fail on a copy of the file with one mistake in it:
  - the MPIJob's own fields (kubeflow.org/v2beta1) against a strict schema written here from the MPI
    Operator's sources (MPIJOB_SCHEMA below);
  - the Launcher's and Worker's pod templates, and the metadata, against Kubernetes' own JSON schemas
    (strict: an unknown field is an error), as the kubernetes-validate package ships them;
  - consistency with the image: the Dockerfile, entrypoint.sh, deploy/ssh/ and the harness's options.
"""

import contextlib
import io
import json
import os
import re
import shlex
from functools import cache

import pytest
import yaml

from harness.arguments import parse_args

REASON = "kubernetes-validate (Kubernetes' JSON schemas, with jsonschema) is not installed: the `test` extra"
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason=REASON)
jsonschema = pytest.importorskip("jsonschema", reason=REASON)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MPIJOB = os.path.join(ROOT, "deploy", "mpijob.yaml")

# The pod templates are checked against both: the MPI Operator v0.8 is built and tested against Kubernetes
# 1.35 (its Makefile's ENVTEST_K8S_VERSION); 1.29 stands for the older clusters still in service.
KUBERNETES_VERSIONS = ("1.29", "1.35")

# ---- the MPIJob's own fields ----------------------------------------------------------------------------
# Field names, types and enums from kubeflow/mpi-operator v0.8.2 (commit caa3c47):
# pkg/apis/kubeflow/v2beta1/types.go (MPIJobSpec, RunPolicy, SchedulingPolicy, ReplicaSpec and their enum
# constants) and deploy/v2beta1/mpi-operator.yaml (the CRD's openAPIV3Schema: types, int32/int64, defaults).
# Value rules from pkg/apis/kubeflow/validation/validation.go, which the operator applies after defaulting
# (a job that breaks them is accepted by the API server and then fails): Launcher required, with replicas 1;
# restartPolicy Never or OnFailure (the API's ExitCode and Always are rejected there); cleanPodPolicy All,
# Running or None; non-negative counts; the name rule in operator_name_problems(). A cluster drops unknown
# fields (or, under kubectl's --validate=strict, refuses them); here they are errors before any cluster.
# Required here beyond the operator (it has defaults, wrong for this image): slotsPerWorker (default 1:
# one rank on a 4-GPU worker), sshAuthMountPath (default /root/.ssh: the image's user is not root), a Worker
# spec, replicas and template.
INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
INT64 = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
QUANTITY = {  # a resource.Quantity, as the CRD writes it (x-kubernetes-int-or-string)
    "anyOf": [
        {"type": "integer"},
        {
            "type": "string",
            "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
            r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
        },
    ]
}


def strict(properties, required=()):
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


def replica_spec(replicas):
    template = {  # the rest of the template: Kubernetes' PodTemplateSpec schema (kubernetes_problems)
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["containers"],
                "properties": {"containers": {"type": "array", "minItems": 1}},  # validation.go
            }
        },
    }
    properties = {
        "replicas": replicas,
        "restartPolicy": {"enum": ["Never", "OnFailure"]},
        "template": template,
    }
    return strict(properties, required=["replicas", "template"])


MPIJOB_SCHEMA = strict(
    {
        "apiVersion": {"const": "kubeflow.org/v2beta1"},
        "kind": {"const": "MPIJob"},
        "metadata": {"type": "object", "required": ["name"]},  # the rest: Kubernetes' ObjectMeta schema
        "spec": strict(
            {
                "slotsPerWorker": INT32,
                "runLauncherAsWorker": {"type": "boolean"},
                "runPolicy": strict(
                    {
                        "cleanPodPolicy": {"enum": ["All", "Running", "None"]},
                        "ttlSecondsAfterFinished": INT32,
                        "activeDeadlineSeconds": INT64,
                        "backoffLimit": INT32,
                        "schedulingPolicy": strict(
                            {
                                "minAvailable": INT32,
                                "queue": {"type": "string"},
                                "minResources": {"type": "object", "additionalProperties": QUANTITY},
                                "priorityClass": {"type": "string"},
                                "scheduleTimeoutSeconds": INT32,
                            }
                        ),
                        "suspend": {"type": "boolean"},
                        "managedBy": {"enum": ["kubeflow.org/mpi-operator", "kueue.x-k8s.io/multikueue"]},
                    }
                ),
                "mpiReplicaSpecs": strict(
                    {
                        "Launcher": replica_spec({**INT32, "const": 1}),
                        "Worker": replica_spec({**INT32, "minimum": 1}),
                    },
                    required=["Launcher", "Worker"],
                ),
                "sshAuthMountPath": {"type": "string", "minLength": 1},
                "launcherCreationPolicy": {"enum": ["AtStartup", "WaitForWorkersReady"]},
                "mpiImplementation": {"enum": ["OpenMPI", "Intel", "MPICH"]},
            },
            required=["mpiReplicaSpecs", "slotsPerWorker", "sshAuthMountPath"],
        ),
    },
    required=["apiVersion", "kind", "metadata", "spec"],
)


def where(path):
    """A field's path as written in messages: spec.mpiReplicaSpecs.Worker.template.spec.containers[0]."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][\w-]*", part):
            text += f".{part}" if text else part
        else:
            text += f"[{part!r}]"
    return text or "(top level)"


def describe(error, prefix=()):
    """jsonschema's error as lines 'PATH: what is wrong', PATH naming the bad field itself."""
    path = list(prefix) + list(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties", {})
        patterns = error.schema.get("patternProperties", {})
        extra = [k for k in error.instance if k not in known and not any(re.search(p, k) for p in patterns)]
        return [f"{where(path + [k])}: unknown field" for k in extra]
    missing = re.fullmatch(r"'(.+)' is a required property", error.message)
    if error.validator == "required" and missing:
        return [f"{where(path + [missing.group(1)])}: required field is missing"]
    return [f"{where(path)}: {error.message}"]


def mpijob_problems(job):
    validator = jsonschema.Draft202012Validator(MPIJOB_SCHEMA)
    errors = sorted(validator.iter_errors(job), key=lambda e: [str(p) for p in e.absolute_path])
    return [line for e in errors for line in describe(e)]


def operator_name_problems(job):
    """validation.go's name rule: the workers' host names, NAME-worker-<i>, are DNS-1035 labels."""
    name = (job.get("metadata") or {}).get("name")
    replicas = job.get("spec", {}).get("mpiReplicaSpecs", {}).get("Worker", {}).get("replicas", 1)
    if not isinstance(name, str) or not isinstance(replicas, int):
        return []
    host = f"{name}-worker-{max(replicas, 1) - 1}"
    if len(host) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", host):
        return []
    return [
        f"metadata.name: {name!r} makes worker host names like {host!r}, not DNS-1035 labels "
        "(lower-case letters, digits and '-', starting with a letter, at most 63 characters)"
    ]


def kubernetes_problems(job):
    """The metadata and each pod template against Kubernetes' strict schemas, wrapped as a PodTemplate
    (kubernetes-validate reports the first mistake in each)."""
    bodies = []
    if isinstance(job.get("metadata"), dict):
        bodies.append(((), {"metadata": job["metadata"]}))
    specs = job.get("spec", {}).get("mpiReplicaSpecs") if isinstance(job.get("spec"), dict) else None
    for role, replica in (specs or {}).items() if isinstance(specs, dict) else ():
        if isinstance(replica, dict) and isinstance(replica.get("template"), dict):
            bodies.append((("spec", "mpiReplicaSpecs", role), {"template": replica["template"]}))
    problems = []
    for prefix, body in bodies:
        found = {}  # message: the versions that gave it
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(
                    dict(apiVersion="v1", kind="PodTemplate", **body), version, strict=True
                )
            except kubernetes_validate.ValidationError as e:
                for line in describe(e, prefix):
                    found.setdefault(line, []).append(version)
        problems += [f"{line} (Kubernetes {', '.join(versions)})" for line, versions in found.items()]
    return problems


def schema_problems(job):
    return mpijob_problems(job) + operator_name_problems(job) + kubernetes_problems(job)


# ---- consistency with the image -------------------------------------------------------------------------


def _read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def _find(pattern, text, what):
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{what}: not found (pattern {pattern!r}); this test reads it to check deploy/mpijob.yaml"
    return match.group(1)


@cache
def image():
    """What the Dockerfile, entrypoint.sh and deploy/ssh/ say about the image."""
    dockerfile, entrypoint = _read("Dockerfile"), _read("entrypoint.sh")
    user = _find(r"useradd\b.*\s([a-z_][a-z0-9_-]*)\s*\\?$", dockerfile, "Dockerfile: the user's useradd")
    return {
        "entrypoint": json.loads(_find(r"^ENTRYPOINT\s+(\[.*\])\s*$", dockerfile, "Dockerfile: ENTRYPOINT")),
        "entrypoint_copy": _find(
            r"^COPY\s+entrypoint\.sh\s+(\S+)\s*$", dockerfile, "Dockerfile: COPY entrypoint.sh"
        ),
        "uid": int(_find(r"^ARG\s+HARNESS_UID=(\d+)\s*$", dockerfile, "Dockerfile: ARG HARNESS_UID")),
        "home": f"/home/{user}",  # useradd --create-home's default
        "open_mpi": "openmpi-bin" in dockerfile,
        "sshd_mode": re.search(r"^\s*sshd\)\s*$", entrypoint, re.MULTILINE) is not None,
        # what `entrypoint.sh sshd` reads
        "sshd_env": set(re.findall(r"\$\{(HARNESS_(?:SSHD_\w+|STOP_SECONDS))", entrypoint)),
        "rank_vars": _find(
            r"^LAUNCHER_VARS=\((.*)\)\s*$", entrypoint, "entrypoint.sh: LAUNCHER_VARS"
        ).split(),
        "model_def": _find(
            r'^MODEL_DEF="\$\{HARNESS_MODEL_DEF:-(\S+?)\}"', entrypoint, "entrypoint.sh: MODEL_DEF"
        ),
        "output": _find(r'^OUTPUT="\$\{HARNESS_OUTPUT:-(\S+?)\}"', entrypoint, "entrypoint.sh: OUTPUT"),
        "stop_seconds": int(
            _find(
                r'^STOP_SECONDS="\$\{HARNESS_STOP_SECONDS:-(\d+)\}"',
                entrypoint,
                "entrypoint.sh: STOP_SECONDS",
            )
        ),
        "sshd_port": int(_find(r"^Port\s+(\d+)", _read("deploy/ssh/sshd_config"), "sshd_config: Port")),
        "ssh_port": int(_find(r"^\s*Port\s+(\d+)", _read("deploy/ssh/ssh_config"), "ssh_config: Port")),
    }


# mpirun's options (Open MPI 4.1) that this test knows, by name without dashes, with the number of values
# each takes. Another option is reported, so that the program mpirun starts is never misread.
MPIRUN_OPTIONS = {
    **dict.fromkeys(["np", "n", "c", "N", "npernode", "bind-to", "map-by", "rank-by", "x", "wdir", "wd"], 1),
    **dict.fromkeys(["H", "host", "hostfile", "machinefile", "default-hostfile", "path", "prefix"], 1),
    **dict.fromkeys(["output-filename", "timeout"], 1),
    **dict.fromkeys(["mca", "gmca"], 2),
    **dict.fromkeys(["allow-run-as-root", "oversubscribe", "nooversubscribe", "report-bindings"], 0),
    **dict.fromkeys(["tag-output", "timestamp-output", "display-map", "display-allocation"], 0),
    **dict.fromkeys(["merge-stderr-to-stdout", "use-hwthread-cpus", "v", "verbose", "q", "quiet"], 0),
}
HOSTFILE_OPTIONS = {"H", "host", "hostfile", "machinefile", "default-hostfile"}


def parse_mpirun(args):
    """mpirun's arguments as (options {name: [values, ...]}, program, program's arguments, problem)."""
    options, i = {}, 0
    while i < len(args) and args[i].startswith("-"):
        count = MPIRUN_OPTIONS.get(args[i].lstrip("-"))
        if count is None:
            return (
                options,
                None,
                [],
                f"mpirun option {args[i]!r} is unknown to this test: add it to MPIRUN_OPTIONS",
            )
        if i + count >= len(args):
            return options, None, [], f"mpirun option {args[i]!r} needs {count} value(s)"
        options.setdefault(args[i].lstrip("-"), []).append(args[i + 1 : i + 1 + count])
        i += 1 + count
    if i == len(args):
        return options, None, [], "no program after mpirun's options"
    return options, args[i], args[i + 1 :], None


def launcher_problems(job, base, container):
    """The launcher's mpirun: its -np, and the program it starts on the workers with its arguments."""
    img, spec = image(), job["spec"]
    argv = list(container.get("command") or img["entrypoint"]) + list(container.get("args", []))
    if argv[: len(img["entrypoint"])] == img["entrypoint"] and len(argv) > len(img["entrypoint"]):
        argv = argv[len(img["entrypoint"]) :]  # entrypoint.sh execs a command given as its first argument
    elif os.path.basename(argv[0]) == "mpirun":  # mpirun as PID 1 kills the ranks a few s after SIGTERM
        return [
            f"{base}.containers[0]: runs mpirun itself: pod deletion would kill the ranks without a "
            f"checkpoint; run it through the entrypoint ({img['entrypoint'][0]} mpirun ...)"
        ], None
    if os.path.basename(argv[0]) != "mpirun":
        return [f"{base}.containers[0]: runs {shlex.join(argv)!r}, not mpirun"], None
    options, program, program_args, problem = parse_mpirun(argv[1:])
    if problem:
        return [f"{base}.containers[0].args: {problem}"], None
    problems = []
    if HOSTFILE_OPTIONS & set(options):
        problems.append(
            f"{base}.containers[0].args: -H/--hostfile: the operator writes the hostfile "
            "(OMPI_MCA_orte_default_hostfile), one line per worker with slotsPerWorker slots"
        )
    workers = spec["mpiReplicaSpecs"]["Worker"]["replicas"] + (1 if spec.get("runLauncherAsWorker") else 0)
    slots = workers * spec["slotsPerWorker"]
    for name in ("np", "n", "c"):
        for (value,) in options.get(name, []):
            if value != str(slots):
                problems.append(
                    f"{base}.containers[0].args: -{name} {value}, but the job has {slots} slots "
                    f"({workers} workers x slotsPerWorker {spec['slotsPerWorker']})"
                )
    if program != img["entrypoint"][0]:
        problems.append(
            f"{base}.containers[0].args: mpirun starts {program!r} on the workers, not the image's "
            f"entrypoint {img['entrypoint'][0]}, which makes each process one rank"
        )
        return problems, None
    # What entrypoint.sh does with them: a first argument that is no option is a model directory (or a
    # command, run instead of training); the rest go to harness, after MODEL_DEF --output OUTPUT.
    env = dict(v.split("=", 1) for (v,) in options.get("x", []) if "=" in v)
    model, output = env.get("HARNESS_MODEL_DEF", img["model_def"]), env.get("HARNESS_OUTPUT", img["output"])
    if program_args and not program_args[0].startswith("-"):
        if not program_args[0].startswith("/"):
            problems.append(
                f"{base}.containers[0].args: {program_args[0]!r} after the entrypoint: entrypoint.sh "
                "runs a command given there instead of training; a model directory is an absolute path"
            )
            return problems, None
        model, program_args = program_args[0], program_args[1:]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parsed = parse_args([model, "--output", output, *program_args])
    except SystemExit:
        message = stderr.getvalue().strip().splitlines()[-1]
        problems.append(f"{base}.containers[0].args: harness rejects {shlex.join(program_args)!r}: {message}")
        return problems, None
    return problems, parsed


def volume_problems(job, base, pod, role):
    """Mounts name volumes of their pod; nothing collides with what the operator adds to the pod."""
    problems = []
    volumes = [v.get("name") for v in pod.get("volumes", [])]
    for name in {n for n in volumes if volumes.count(n) > 1}:
        problems.append(f"{base}.volumes: {name!r} is there twice")
    for name in {"ssh-auth", "mpi-job-config"} & set(volumes):  # mpi_job_controller.go's volumes
        problems.append(f"{base}.volumes: {name!r} is the name of a volume the operator adds")
    reserved = {job["spec"]["sshAuthMountPath"]} | ({"/etc/mpi"} if role == "Launcher" else set())
    for kind in ("initContainers", "containers"):
        for ci, container in enumerate(pod.get(kind, [])):
            for mi, mount in enumerate(container.get("volumeMounts", [])):
                at = f"{base}.{kind}[{ci}].volumeMounts[{mi}]"
                if mount.get("name") not in volumes:
                    problems.append(f"{at}.name: no volume {mount.get('name')!r} in {base}.volumes")
                if mount.get("mountPath", "").rstrip("/") in reserved:
                    problems.append(
                        f"{at}.mountPath: the operator mounts its own volume at {mount['mountPath']}"
                    )
    return problems


def worker_problems(job, base, pod, container, harness_args):
    img, spec, problems = image(), job["spec"], []
    argv = list(container.get("command") or img["entrypoint"]) + list(container.get("args", []))
    if argv[: len(img["entrypoint"]) + 1] != img["entrypoint"] + ["sshd"] or not img["sshd_mode"]:
        problems.append(
            f"{base}.containers[0]: runs {shlex.join(argv)!r}, not the image's sshd mode "
            f"({img['entrypoint'][0]} sshd: README, Several machines)"
        )
    for i, var in enumerate(container.get("env", [])):
        if var.get("name") not in img["sshd_env"]:
            problems.append(
                f"{base}.containers[0].env[{i}] ({var.get('name')}): never reaches the ranks, which "
                "sshd starts with a fresh environment: pass it with the launcher's mpirun -x"
            )
    if container.get("envFrom"):
        problems.append(f"{base}.containers[0].envFrom: never reaches the ranks (sshd): use mpirun -x")
    gpus = (container.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu")
    if gpus is not None and str(gpus) != str(spec["slotsPerWorker"]):
        problems.append(
            f"{base}.containers[0].resources.limits['nvidia.com/gpu']: {gpus} GPUs, but "
            f"slotsPerWorker {spec['slotsPerWorker']} ranks: the image runs one rank per GPU"
        )
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
    if "ssh" in ports and ports["ssh"] != img["sshd_port"]:
        problems.append(
            f"{base}.containers[0].ports (ssh): {ports['ssh']}, but sshd listens on {img['sshd_port']}"
        )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        port = (container.get(probe) or {}).get("tcpSocket", {}).get("port")
        if port is not None and ports.get(port, port) != img["sshd_port"]:
            problems.append(
                f"{base}.containers[0].{probe}.tcpSocket.port: {port}, not sshd's {img['sshd_port']}"
            )
    # Where the ranks read the model definition and write their output, and the shared memory they need.
    volumes = {v.get("name"): v for v in pod.get("volumes", [])}
    mounts = {m.get("mountPath", "").rstrip("/"): m for m in container.get("volumeMounts", [])}

    def mount_of(path):  # the mount that holds path: at it, or at the nearest folder above it
        while path not in mounts and path:
            path = os.path.dirname(path).rstrip("/")
        return mounts.get(path)

    if harness_args is not None:
        for what, path in (("model definition", harness_args.model_def), ("output", harness_args.output)):
            if mount_of(path.rstrip("/")) is None:
                problems.append(f"{base}.containers[0].volumeMounts: nothing at {path}, the ranks' {what}")
        out = mount_of(harness_args.output.rstrip("/"))
        if out is not None and out.get("readOnly"):
            problems.append(f"{base}.containers[0].volumeMounts ({out['mountPath']}): the ranks write there")
        if out is not None and "emptyDir" in volumes.get(out.get("name"), {}):
            problems.append(
                f"{base}.volumes ({out.get('name')}): an emptyDir output is each worker's own, "
                "and is gone with the pod: use a volume the workers share"
            )
    shm = volumes.get(mounts.get("/dev/shm", {}).get("name"), {})
    if shm.get("emptyDir", {}).get("medium") != "Memory":
        problems.append(
            f"{base}.containers[0].volumeMounts: no memory emptyDir at /dev/shm (the 64 MB default "
            "breaks DataLoader workers and NCCL)"
        )
    return problems


def consistency_problems(job):
    """deploy/mpijob.yaml against the image (Dockerfile, entrypoint.sh, deploy/ssh/, the harness's options).
    Expects a job that passes schema_problems()."""
    img, spec = image(), job["spec"]
    replicas = spec["mpiReplicaSpecs"]
    base = {role: f"spec.mpiReplicaSpecs.{role}.template.spec" for role in replicas}
    pods = {role: replicas[role]["template"]["spec"] for role in replicas}
    launcher, worker = pods["Launcher"]["containers"][0], pods["Worker"]["containers"][0]
    problems = []
    if img["entrypoint_copy"] != img["entrypoint"][0]:
        problems.append(
            f"Dockerfile: entrypoint.sh is copied to {img['entrypoint_copy']}, not the ENTRYPOINT"
        )
    if img["ssh_port"] != img["sshd_port"]:
        problems.append(
            f"deploy/ssh: ssh_config's Port {img['ssh_port']} is not sshd_config's {img['sshd_port']}"
        )
    if spec.get("mpiImplementation", "OpenMPI") != "OpenMPI" or not img["open_mpi"]:
        problems.append("spec.mpiImplementation: the image has Open MPI (openmpi-bin): OpenMPI")
    if "OMPI_COMM_WORLD_RANK" not in img["rank_vars"]:
        problems.append("entrypoint.sh: LAUNCHER_VARS lacks OMPI_COMM_WORLD_RANK, which mpirun's ranks have")
    if launcher.get("image") != worker.get("image"):
        problems.append(
            f"{base['Launcher']}.containers[0].image: not the workers' image: the launcher's mpirun "
            "and ssh client must be the workers' (their Open MPI, deploy/ssh/ssh_config)"
        )
    if spec["sshAuthMountPath"].rstrip("/") != f"{img['home']}/.ssh":
        problems.append(
            f"spec.sshAuthMountPath: {spec['sshAuthMountPath']}, but the image's user (uid "
            f"{img['uid']}) has its keys in {img['home']}/.ssh, where `entrypoint.sh sshd` and ssh "
            "look for them"
        )
    policy = spec.get("launcherCreationPolicy", "AtStartup")
    if policy != "WaitForWorkersReady" and spec.get("runPolicy", {}).get("backoffLimit", 6) == 0:
        problems.append(
            "spec.launcherCreationPolicy: AtStartup, and the launcher has one try (backoffLimit 0): "
            "its mpirun fails the job if a worker is not Ready (no DNS name yet): WaitForWorkersReady"
        )
    for role, pod in pods.items():
        if "restartPolicy" in pod:
            problems.append(f"{base[role]}.restartPolicy: the operator overrides it: set the replica spec's")
        for i, container in enumerate(pod["containers"]):
            uid = (container.get("securityContext") or {}).get("runAsUser")
            uid = (pod.get("securityContext") or {}).get("runAsUser") if uid is None else uid
            if uid is not None and uid != img["uid"]:
                problems.append(
                    f"{base[role]}.containers[{i}]: runs as uid {uid}, not the image's user "
                    f"({img['uid']}, home {img['home']}, where the ssh keys are)"
                )
        problems += volume_problems(job, base[role], pod, role)
        # The entrypoint's wait for the ranks' checkpoint must end before kubelet's SIGKILL.
        grace = pod.get("terminationGracePeriodSeconds", 30)
        env = {v.get("name"): v.get("value") for v in pod["containers"][0].get("env", [])}
        stop = int(env.get("HARNESS_STOP_SECONDS") or img["stop_seconds"])
        if stop >= grace:
            problems.append(
                f"{base[role]}.terminationGracePeriodSeconds: {grace} s, but the entrypoint waits up to "
                f"{stop} s (HARNESS_STOP_SECONDS) for the checkpoint: SIGKILL would come first"
            )
    launcher_gpus = (launcher.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu")
    if launcher_gpus and not spec.get("runLauncherAsWorker"):
        problems.append(f"{base['Launcher']}.containers[0].resources: GPUs for a launcher that runs no rank")
    more, harness_args = launcher_problems(job, base["Launcher"], launcher)
    problems += more
    problems += worker_problems(job, base["Worker"], pods["Worker"], worker, harness_args)
    return problems


# ---- the tests ------------------------------------------------------------------------------------------


def load_job():
    with open(MPIJOB) as f:
        return yaml.safe_load(f)


def test_the_schemas_of_the_kubernetes_versions_are_installed():
    for version in KUBERNETES_VERSIONS:
        got = kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate"}, version, strict=True)
        assert got == version, (
            f"kubernetes-validate {kubernetes_validate.__version__} checks {version} as {got}"
        )


def test_deploy_mpijob_is_valid_and_fits_the_image():
    job = load_job()
    assert schema_problems(job) == []
    assert consistency_problems(job) == []


def test_what_the_yaml_invites_passes():
    """Harness options after the entrypoint (the YAML's comment), an output folder below the mount."""
    job = load_job()
    args = container(job["spec"]["mpiReplicaSpecs"]["Launcher"])["args"]
    args[args.index("-x") : args.index("-x")] = ["-x", "HARNESS_OUTPUT=/output/run1"]
    args += ["--config", "/model_def/other.yaml", "--quiet"]
    assert schema_problems(job) == []
    assert consistency_problems(job) == []


def worker(job):
    return job["spec"]["mpiReplicaSpecs"]["Worker"]


def launcher(job):
    return job["spec"]["mpiReplicaSpecs"]["Launcher"]


def container(replica):
    return replica["template"]["spec"]["containers"][0]


def rename(mapping, old, new):
    mapping[new] = mapping.pop(old)


W = "spec.mpiReplicaSpecs.Worker"
L = "spec.mpiReplicaSpecs.Launcher"
SCHEMA_MISTAKES = [
    # unknown (misspelled) fields: the MPIJob's and the pods'
    (lambda j: rename(worker(j), "replicas", "replica"), f"{W}.replica: unknown field"),
    (lambda j: rename(j["spec"], "slotsPerWorker", "slotPerWorker"), "spec.slotPerWorker: unknown field"),
    (
        lambda j: rename(j["spec"]["runPolicy"], "backoffLimit", "backOffLimit"),
        "spec.runPolicy.backOffLimit: unknown",
    ),
    (
        lambda j: rename(j["spec"]["mpiReplicaSpecs"], "Worker", "worker"),
        "spec.mpiReplicaSpecs.worker: unknown",
    ),
    (
        lambda j: rename(container(worker(j)), "volumeMounts", "volumeMount"),
        f"{W}.template.spec.containers[0].volumeMount: unknown field (Kubernetes 1.29, 1.35)",
    ),
    (
        lambda j: rename(worker(j)["template"]["spec"]["volumes"][0], "configMap", "configmap"),
        f"{W}.template.spec.volumes[0].configmap: unknown field",
    ),
    (
        lambda j: rename(launcher(j)["template"]["spec"]["securityContext"], "runAsNonRoot", "runAsNonroot"),
        f"{L}.template.spec.securityContext.runAsNonroot: unknown field",
    ),
    (
        lambda j: rename(container(launcher(j))["resources"], "limits", "limit"),
        "containers[0].resources.limit: unknown",
    ),
    (lambda j: j["metadata"].update(labels={"a": "b"}, nmae="x"), "metadata.nmae: unknown field"),
    # wrong types and values
    (lambda j: worker(j).update(replicas="2"), f"{W}.replicas: '2' is not of type 'integer'"),
    (lambda j: j["spec"].update(slotsPerWorker=4.5), "spec.slotsPerWorker: 4.5 is not of type 'integer'"),
    (
        lambda j: j["spec"]["runPolicy"].update(cleanPodPolicy="Always"),
        "spec.runPolicy.cleanPodPolicy: 'Always' is not",
    ),
    (lambda j: launcher(j).update(restartPolicy="Always"), f"{L}.restartPolicy: 'Always' is not one of"),
    (lambda j: launcher(j).update(replicas=2), f"{L}.replicas: 1 was expected"),
    (
        lambda j: j["spec"].update(mpiImplementation="openmpi"),
        "spec.mpiImplementation: 'openmpi' is not one of",
    ),
    (lambda j: j.update(apiVersion="kubeflow.org/v1"), "apiVersion: 'kubeflow.org/v2beta1' was expected"),
    (
        lambda j: j["metadata"].update(name="Harness_Train"),
        "metadata.name: 'Harness_Train' makes worker host names",
    ),
    (
        lambda j: container(worker(j))["ports"][0].update(containerPort="2222"),
        f"{W}.template.spec.containers[0].ports[0].containerPort: '2222' is not of type 'integer'",
    ),
    (
        lambda j: container(worker(j)).update(env=[{"name": "N", "value": 1}]),
        f"{W}.template.spec.containers[0].env[0].value: 1 is not of type",
    ),
    (
        lambda j: container(launcher(j)).update(args="-np 8"),
        f"{L}.template.spec.containers[0].args: '-np 8' is not of type 'array'",
    ),
    # missing required fields
    (lambda j: j["spec"].pop("mpiReplicaSpecs"), "spec.mpiReplicaSpecs: required field is missing"),
    (lambda j: j["spec"]["mpiReplicaSpecs"].pop("Launcher"), f"{L}: required field is missing"),
    (lambda j: worker(j).pop("template"), f"{W}.template: required field is missing"),
    (lambda j: launcher(j)["template"]["spec"].update(containers=[]), f"{L}.template.spec.containers: [] "),
    (
        lambda j: container(worker(j)).pop("name"),
        f"{W}.template.spec.containers[0].name: required field is missing",
    ),
    (
        lambda j: container(worker(j))["volumeMounts"][0].pop("mountPath"),
        f"{W}.template.spec.containers[0].volumeMounts[0].mountPath: required field is missing",
    ),
]


@pytest.mark.parametrize("mistake, message", SCHEMA_MISTAKES, ids=[m for _, m in SCHEMA_MISTAKES])
def test_schema_mistakes_are_caught_by_path(mistake, message):
    job = load_job()
    mistake(job)
    problems = schema_problems(job)
    assert any(message in p for p in problems), problems


CONSISTENCY_MISTAKES = [
    (lambda j: container(worker(j)).update(args=["bash"]), f"{W}.template.spec.containers[0]: runs "),
    (
        lambda j: container(worker(j)).update(command=["/usr/sbin/sshd", "-De"], args=[]),
        "not the image's sshd mode",
    ),
    (lambda j: container(launcher(j))["args"].__setitem__(1, "6"), "-np 6, but the job has 8 slots"),
    (
        lambda j: worker(j).update(replicas=3),
        "-np 8, but the job has 12 slots (3 workers x slotsPerWorker 4)",
    ),
    (lambda j: j["spec"].update(slotsPerWorker=2), "4 GPUs, but slotsPerWorker 2 ranks"),
    (
        lambda j: container(worker(j))["volumeMounts"][1].update(name="outputs"),
        f"{W}.template.spec.containers[0].volumeMounts[1].name: no volume 'outputs'",
    ),
    (
        lambda j: container(worker(j))["volumeMounts"].pop(0),
        "nothing at /model_def, the ranks' model definition",
    ),
    (
        lambda j: container(worker(j))["volumeMounts"][1].update(readOnly=True),
        "(/output): the ranks write there",
    ),
    (lambda j: container(worker(j))["volumeMounts"].pop(2), "no memory emptyDir at /dev/shm"),
    (lambda j: j["spec"].update(sshAuthMountPath="/root/.ssh"), "spec.sshAuthMountPath: /root/.ssh, but"),
    (
        lambda j: container(launcher(j))["args"].__setitem__(-1, "/entrypoint.sh"),
        "not the image's entrypoint",
    ),
    (lambda j: container(launcher(j))["args"].append("bash"), "'bash' after the entrypoint"),
    (lambda j: container(launcher(j))["args"].append("--epochs"), "harness rejects '--epochs'"),
    (
        lambda j: container(launcher(j))["args"].insert(0, "--hostfile=/x"),
        "'--hostfile=/x' is unknown to this test",
    ),
    (
        lambda j: container(launcher(j))["args"].__setitem__(slice(0, 0), ["-H", "w0:4,w1:4"]),
        "-H/--hostfile: the operator writes the hostfile",
    ),
    (lambda j: container(launcher(j)).update(image="other:1"), "image: not the workers' image"),
    (lambda j: container(launcher(j)).update(command=["mpirun"]), "runs mpirun itself: pod deletion"),
    (
        lambda j: worker(j)["template"]["spec"].pop("terminationGracePeriodSeconds"),
        f"{W}.template.spec.terminationGracePeriodSeconds: 30 s, but the entrypoint waits up to 50 s",
    ),
    (
        lambda j: container(worker(j)).update(env=[{"name": "NCCL_DEBUG", "value": "INFO"}]),
        "never reaches the ranks",
    ),
    (lambda j: j["spec"].pop("launcherCreationPolicy"), "spec.launcherCreationPolicy: AtStartup"),
    (
        lambda j: container(worker(j))["ports"][0].update(containerPort=22),
        "ports (ssh): 22, but sshd listens on 2222",
    ),
    (lambda j: worker(j)["template"]["spec"]["securityContext"].update(runAsUser=0), "runs as uid 0"),
    (
        lambda j: container(launcher(j))["resources"]["limits"].update({"nvidia.com/gpu": 1}),
        "GPUs for a launcher",
    ),
    (lambda j: worker(j)["template"]["spec"].update(restartPolicy="Never"), "the operator overrides it"),
    (
        lambda j: worker(j)["template"]["spec"]["volumes"].append({"name": "ssh-auth", "emptyDir": {}}),
        "'ssh-auth' is the name of a volume the operator adds",
    ),
    (
        lambda j: worker(j)["template"]["spec"]["volumes"].__setitem__(1, {"name": "output", "emptyDir": {}}),
        "an emptyDir output is each worker's own",
    ),
]


@pytest.mark.parametrize("mistake, message", CONSISTENCY_MISTAKES, ids=[m for _, m in CONSISTENCY_MISTAKES])
def test_consistency_mistakes_are_caught(mistake, message):
    job = load_job()
    mistake(job)
    problems = consistency_problems(job)
    assert any(message in p for p in problems), problems
