"""Running on a cluster: the shipped cluster/ configs, address errors, and a real submitted job.

The job test starts its own ``ray start --head`` (own ports and temp dir), submits ``run.py
train`` through the Jobs API, and stops only the processes of that head afterwards.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import run
from gtms.config import RayConfig, load_config
from gtms.runtime import RayStartError, init_ray
from gtms.tune.sweep import load_sweep

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = {"aws.yaml": "aws", "gcp.yaml": "gcp"}
RAYJOB = "kuberay-rayjob.yaml"
RAY_VERSION = "2.60.0"
EXPERIMENTS = REPO / "experiments"
# OpenAI's CLIP checkpoints: the folder in the URL is the file's SHA-256 (OpenAI's clip.py checks
# the download against it).
CLIP_SHA256 = {
    "RN50.pt": "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
    "RN101.pt": "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599",
}
CLIP_URL = re.compile(r"https://openaipublic\.azureedge\.net/clip/models/([0-9a-f]{64})/(\w+\.pt)")
SHA256SUM_LINE = re.compile(r"echo \"([0-9a-f]{64})  (\w+\.pt)\" \| sha256sum -c")


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free right now (bound together, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# --- every key documented ---------------------------------------------------------------------

KEY_LINE = re.compile(r"""^\s*(?:-\s+)?(?:"[^"]*"|'[^']*'|[^\s#'"{}\[\]][^:#]*?)\s*:(?:\s|$)""")
QUOTED = re.compile(r""""[^"]*"|'[^']*'""")


def undocumented_keys(text: str) -> list[tuple[int, str]]:
    """(line number, line) of each YAML key line with neither an inline ``# comment`` nor a
    comment line directly above it. Lines inside block scalars are checked too (the KubeRay
    runtimeEnvYAML is itself YAML)."""
    missing, previous = [], ""
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            previous = ""
            continue
        if stripped.startswith("#"):
            previous = stripped
            continue
        if KEY_LINE.match(line):
            inline = re.search(r"(^|\s)#", QUOTED.sub('""', line))
            if not inline and not previous.startswith("#"):
                missing.append((number, line))
        previous = stripped
    return missing


def test_comment_checker_flags_only_undocumented_keys():
    text = ("# the name\nname: a\nsize: 2  # inline\n\n# list\nitems:\n  - plain item\n"
            "  - key: v\nurl: \"http://x#y\"\n")
    assert undocumented_keys(text) == [(8, "  - key: v"), (9, 'url: "http://x#y"')]


def test_cluster_folder_holds_the_configs_and_their_guide():
    names = {p.name for p in CLUSTER.iterdir()}
    assert {"aws.yaml", "gcp.yaml", RAYJOB, "README.md"} <= names


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_every_key_in_cluster_yaml_has_a_comment(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    missing = undocumented_keys(path.read_text())
    assert not missing, "keys without a comment:\n" + "\n".join(f"{path.name}:{n}: {line}"
                                                              for n, line in missing)


# --- cluster launcher -------------------------------------------------------------------------

@pytest.mark.parametrize("name,provider", sorted(LAUNCHER_CONFIGS.items()))
def test_launcher_config_names_what_ray_requires(name, provider):
    cfg = load(name)
    assert cfg["cluster_name"] and isinstance(cfg["max_workers"], int)
    assert cfg["provider"]["type"] == provider
    assert cfg["provider"]["region"]
    if provider == "gcp":
        assert cfg["provider"]["project_id"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for node_type in types.values():
        assert {"node_config", "resources", "min_workers", "max_workers"} <= set(node_type)
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    gpu = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["max_workers"] > t["min_workers"] >= 0 for t in gpu)  # autoscaling
    assert "GPU" not in types[cfg["head_node_type"]]["resources"]  # CPU head
    images = [v for k, v in cfg["docker"].items() if k.endswith("image")]
    assert "image" in cfg["docker"]
    for image in images:
        repo, _, tag = image.partition(":")
        assert repo == "rayproject/ray" and tag.startswith(f"{RAY_VERSION}-"), image
        assert "latest" not in tag, image
    assert cfg["docker"]["image"].endswith("-gpu")
    assert any("pip install -r" in c and "requirements.txt" in c for c in cfg["setup_commands"])
    assert "." in cfg["file_mounts"].values()  # the project
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "--head" in head_start


@pytest.mark.parametrize("name", sorted(LAUNCHER_CONFIGS))
def test_launcher_config_passes_rays_own_schema(name):
    """The launcher's own validation (``ray up`` runs the same after filling defaults)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(name)))


# --- KubeRay ----------------------------------------------------------------------------------

def test_rayjob_manifest_runs_run_py_on_ray_2_60_with_gpu_workers():
    job = load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith(
        "python run.py train --config experiments/refcoco_rn101.yaml")
    assert (REPO / "experiments" / "refcoco_rn101.yaml").is_file()
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY_VERSION
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"].startswith(f"rayproject/ray:{RAY_VERSION}-")
    gpu_groups = []
    for group in cluster["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            assert container["image"].startswith(f"rayproject/ray:{RAY_VERSION}-")
            if int(container["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1:
                gpu_groups.append(group)
    assert gpu_groups and all(g["maxReplicas"] >= g["minReplicas"] for g in gpu_groups)


def test_rayjob_pip_list_matches_requirements_txt():
    """The RayJob cannot read requirements.txt, so it lists the pins; keep them in step."""
    pins = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#") and not line.startswith("ray[")]
    runtime_env = yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])
    assert runtime_env["pip"] == pins


# --- the cluster configs and the experiments agree -------------------------------------------

def downloaded_weights(name: str) -> dict[str, str]:
    """{file name: SHA-256} of the CLIP weights a cluster config downloads, each URL's hash
    required to equal the one `sha256sum -c` checks."""
    text = (CLUSTER / name).read_text()
    urls = {file: digest for digest, file in CLIP_URL.findall(text)}
    checked = {file: digest for digest, file in SHA256SUM_LINE.findall(text)}
    assert urls == checked, (name, urls, checked)
    return urls


def weights_needed() -> dict[str, set[str]]:
    """{CLIP file name: experiment files that need it} over experiments/*.yaml."""
    needed: dict[str, set[str]] = {}
    for path in sorted(EXPERIMENTS.glob("*.yaml")):
        weights = load_config(path).model.clip_weights
        if weights:
            needed.setdefault(Path(weights).name, set()).add(path.name)
    return needed


def cluster_gpus(name: str) -> int:
    """Most GPUs the cluster can have at once."""
    cfg = load(name)
    if name == RAYJOB:
        return sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) * g["maxReplicas"]
                   for g in cfg["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                   for c in g["template"]["spec"]["containers"])
    types = [t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]
    nodes_left, gpus = cfg["max_workers"], 0
    for node_type in sorted(types, key=lambda t: -t["resources"].get("GPU", 0)):
        nodes = min(node_type["max_workers"], nodes_left)
        gpus += nodes * int(node_type["resources"].get("GPU", 0))
        nodes_left -= nodes
    return gpus


def test_clip_weights_urls_name_their_sha256():
    for name in [*LAUNCHER_CONFIGS, RAYJOB]:
        assert downloaded_weights(name) == CLIP_SHA256, name


def test_every_cluster_config_downloads_the_weights_every_experiment_needs():
    """RN50 for the *_rn50 experiments (Table 2's ablation, the sweeps), RN101 for *_rn101."""
    needed = weights_needed()
    assert "RN50.pt" in needed and "ablation_refcoco_rn50.yaml" in needed["RN50.pt"]
    assert "RN101.pt" in needed
    for name in [*LAUNCHER_CONFIGS, RAYJOB]:
        missing = set(needed) - set(downloaded_weights(name))
        assert not missing, f"{name} does not download {missing} ({needed})"


def test_cluster_sizes_are_the_ones_the_docs_name():
    assert {name: cluster_gpus(name) for name in [*LAUNCHER_CONFIGS, RAYJOB]} == \
        {"aws.yaml": 4, "gcp.yaml": 4, RAYJOB: 4}


def trial_gpus(cfg) -> float:
    return cfg.ray.num_workers * cfg.ray.gpus_per_worker


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("sweep*.yaml")), ids=lambda p: p.name)
def test_sweep_trials_at_once_fit_the_cluster(path):
    cfg, spec = load_sweep(path)
    need = trial_gpus(cfg) * spec.max_concurrent_trials
    for name in [*LAUNCHER_CONFIGS, RAYJOB]:
        assert need <= cluster_gpus(name), (path.name, name, need)


def node_cpus_per_gpu(name: str) -> list[float]:
    """CPUs per GPU of every GPU node type (launcher) or GPU pod request (KubeRay)."""
    cfg = load(name)
    if name == RAYJOB:
        return [float(c["resources"]["requests"]["cpu"]) / int(c["resources"]["limits"][
                    "nvidia.com/gpu"])
                for g in cfg["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                for c in g["template"]["spec"]["containers"]
                if c["resources"]["limits"].get("nvidia.com/gpu")]
    return [t["resources"]["CPU"] / t["resources"]["GPU"]
            for t in cfg["available_node_types"].values() if t["resources"].get("GPU")]


def test_gpu_configs_and_nodes_follow_the_cpu_plan():
    """Every GPU experiment asks for gtms.runtime.CPUS_PER_GPU (trainer CPUs, actors per GPU),
    and every GPU node has room for it: trainer + the actor ceiling + Ray Data's reads."""
    from gtms.runtime import CPUS_PER_GPU, READ_TASK_CPUS

    gpu_configs = [load_config(p) for p in sorted(EXPERIMENTS.glob("*.yaml"))]
    gpu_configs = [cfg for cfg in gpu_configs if cfg.ray.use_gpu]
    assert gpu_configs
    for cfg in gpu_configs:
        expected = CPUS_PER_GPU.ray_settings(cfg.ray.num_workers)
        assert {key: getattr(cfg.ray, key) for key in expected} == expected
    need = CPUS_PER_GPU.trainer + CPUS_PER_GPU.actors_max + READ_TASK_CPUS
    for name in [*LAUNCHER_CONFIGS, RAYJOB]:
        cpus = node_cpus_per_gpu(name)
        assert cpus and min(cpus) >= need, (name, cpus, need)


MAX_CONCURRENT = re.compile(r"ablation_refcoco_rn50\.yaml[^\n]*?--max-concurrent (\d+)")


def test_documented_ablation_concurrency_fits_the_cluster():
    """Every `ablate ... ablation_refcoco_rn50.yaml ... --max-concurrent N` in the docs, and the
    N in the file's own header, keeps trial GPUs x N within the cluster's GPUs."""
    path = EXPERIMENTS / "ablation_refcoco_rn50.yaml"
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    in_header = [int(n) for n in re.findall(r"--max-concurrent (\d+)", "\n".join(header))]
    documented = [int(n) for doc in (REPO / "README.md", CLUSTER / "README.md")
                  for n in MAX_CONCURRENT.findall(doc.read_text().replace("\\\n", " "))]
    assert in_header and documented
    gpus = trial_gpus(load_config(path))
    assert gpus == 2  # the paper trained on 2 GPUs
    for n in in_header + documented:
        for name in [*LAUNCHER_CONFIGS, RAYJOB]:
            assert gpus * n <= cluster_gpus(name), (n, name)


# --- joining a cluster: errors ----------------------------------------------------------------

def test_unreachable_address_fails_fast_naming_it(synthref_small, tmp_path, capsys):
    """No minute of ray.init retries: an exit code and the address within seconds. Modules are
    imported first so a loaded machine's cold imports (~8 s of torch and Ray Train) are not
    what is timed."""
    import ray.train.torch  # noqa: F401

    import gtms.train.fit  # noqa: F401

    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    start = time.time()
    code = run.main(["train", "--address", address, "--set", f"data.root=file://{synthref_small}",
                     "--set", f"train.run_dir={tmp_path}", "--set", "train.name=unreachable",
                     "--set", "data.input_size=64", "--set", "pretrain.before_train=false"])
    elapsed = time.time() - start
    err = capsys.readouterr().err
    assert code == 2, err
    assert address in err and "unreachable" in err
    assert elapsed < 10, f"took {elapsed:.1f} s"


@pytest.mark.parametrize("address", ["localhost:notaport", "localhost:99999", "no-port",
                                     "ray://:10001"])
def test_unparsable_address_raises(address):
    with pytest.raises(RayStartError, match="cannot parse Ray address"):
        init_ray(RayConfig(), cli_address=address)


def test_dashboard_url_is_refused_with_a_hint(monkeypatch):
    """RAY_ADDRESS=http://... is what `ray job` wants; run.py must say so, not crash."""
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(RayStartError, match="ray job submit"):
        init_ray(RayConfig())


# --- a real cluster and a submitted job -------------------------------------------------------

def _stop_processes_of(marker: str) -> None:
    """Terminate (then kill) every process whose command line contains ``marker``, with all
    their children: only the head we started, never another Ray on this machine."""
    import ray  # noqa: F401  (Ray vendors psutil in ray/thirdparty_files, put on sys.path)

    psutil = importlib.import_module("psutil")

    own = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid not in own and marker in " ".join(proc.info["cmdline"] or []):
                found[proc.pid] = proc
                found.update((c.pid, c) for c in proc.children(recursive=True))
        except psutil.Error:
            continue
    procs = [p for pid, p in found.items() if pid not in own]
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def ray_head():
    """A real ``ray start --head`` (this interpreter's Ray) in its own short temp dir (unix
    socket paths are limited to ~107 bytes), with every port chosen here so it cannot collide
    with another cluster on this machine."""
    temp_dir = Path(f"/tmp/rt{secrets.token_hex(4)}")
    gcs, dashboard, client, agent, agent_grpc, runtime_env, metrics = free_ports(7)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=4",
        "--disable-usage-stats", f"--temp-dir={temp_dir}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}"]
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dashboard}"}
    finally:
        _stop_processes_of(str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.integration
def test_submitted_job_joins_the_cluster_and_trains(ray_head, synthref_small, tmp_path):
    """``run.py train`` submitted as a Ray job runs on that cluster (RAY_ADDRESS) and writes
    metrics to train.run_dir. Never calls ray.init here: the Jobs API is plain HTTP."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    generator = json.loads((synthref_small / "shards" / "manifest.json").read_text())["generator"]
    client = JobSubmissionClient(ray_head["dashboard"])
    entrypoint = " ".join([
        "python run.py train", f"--set data.root={synthref_small}",
        f"--set data.synthref_images={generator['num_images']}",
        f"--set data.synthref_seed={generator['seed']}",
        f"--set data.synthref_difficulty={generator['difficulty']}",
        "--set data.input_size=64 --set data.limit_train_refs=16 --set data.limit_eval_refs=8",
        "--set train.epochs=1 --set train.batch_size=8", f"--set train.run_dir={tmp_path}",
        "--set train.name=job --set ray.num_workers=1 --set pretrain.before_train=false"])
    runtime_env = {
        "working_dir": str(REPO),
        # Anchored patterns: a bare "data" would also drop the gtms/data package.
        "excludes": ["/data/", "/runs/", "/.git/", "**/__pycache__"],
        # RAY_ADDRESS for the job's actors too: with several Ray instances on this machine,
        # Ray Train's placement-group cleaner cannot guess which one is its own.
        "env_vars": {"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ray_head["gcs"]},
    }
    start = time.time()
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.time() - start < 300:
        time.sleep(1)
        status = client.get_job_status(job_id)
    elapsed = time.time() - start
    logs = client.get_job_logs(job_id)
    if status != JobStatus.SUCCEEDED:
        client.stop_job(job_id)
        pytest.fail(f"job {job_id} ended {status} after {elapsed:.0f} s; logs:\n{logs}")
    lines = logs.splitlines()
    print(f"job {job_id}: SUCCEEDED {elapsed:.1f} s after submission; {len(lines)} log lines\n"
          + "\n".join(lines[:4] + ["..."] + lines[-8:]), file=sys.stderr)

    # It joined the job's cluster instead of starting a second one.
    assert "Started a local Ray instance" not in logs and "started a local Ray" not in logs
    assert re.search(r"joined the Ray cluster at \S+:" + ray_head["gcs"].rsplit(":", 1)[1],
                     logs), logs
    assert "training finished" in logs
    metrics = [json.loads(line) for line in (tmp_path / "job" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [m["epoch"] for m in metrics] == [1]  # epochs are counted from 1, as printed
    assert 0.0 <= metrics[0]["val_mean_iou"] <= 1.0
    assert list((tmp_path / "job").glob("checkpoint_epoch_0001/model.pt"))
