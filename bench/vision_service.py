#!/usr/bin/env python3
"""Image fine-tuning through the service, measured side by side (BENCHMARKS.md, "Image
fine-tuning as a service"):

1. upload validation: MB/s of a generated ImageFolder zip (every image decoded at upload);
2. training images/s of a LoRA job on the built-in `digits` model through the service
   (`molt serve`, one worker) against `molt train` on the same zip, hyperparameters and seed;
3. classification images/s at 1 and 32 images per request (4 concurrent clients), with the
   fine-tuned adapter hot-swapped and merged.

Standard library only; needs the release binary (cargo build --release --bin molt) and curl.

    python3 bench/vision_service.py [--molt target/release/molt] [--images 1500] [--epochs 4]
"""

import argparse
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
import zlib

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def png(w, h, rng):
    """An RGB PNG of noise around a random bright square (poorly compressible, like photos)."""
    x0, y0 = rng.randrange(w // 2), rng.randrange(h // 2)
    rows = []
    for y in range(h):
        row = bytearray(b"\x00")
        for x in range(w):
            base = 200 if x0 <= x < x0 + w // 2 and y0 <= y < y0 + h // 2 else 40
            v = max(0, min(255, base + rng.randrange(-40, 40)))
            row += bytes((v, v // 2, 255 - v))
        rows.append(bytes(row))

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows), 6)) + chunk(b"IEND", b""))


def make_zip(path, n, size):
    rng = random.Random(0)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for i in range(n):
            z.writestr(f"class{i % 4}/{i:05d}.png", png(size, size, rng))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Api:
    def __init__(self, url, key):
        self.url, self.key = url, key

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.key}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def upload(self, path):
        out = subprocess.run(
            ["curl", "-sf", self.url + "/v1/files", "-H", f"Authorization: Bearer {self.key}",
             "-F", "purpose=fine-tune", "-F", f"file=@{path}"],
            check=True, capture_output=True, text=True)
        return json.loads(out.stdout)

    def wait(self, job):
        while True:
            j = self.call("GET", f"/v1/fine_tuning/jobs/{job}")
            if j["status"] in ("succeeded", "failed", "cancelled"):
                return j
            time.sleep(0.5)


def classify_rate(api, model, images, per_request, clients, seconds):
    """Images/s over `seconds` with `clients` concurrent clients sending `per_request` images."""
    done = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(k):
        i = k
        while time.monotonic() < stop:
            batch = [images[(i + j) % len(images)] for j in range(per_request)]
            api.call("POST", "/v1/classifications", {"model": model, "images": batch, "top_k": 1})
            i += per_request
            with lock:
                done[0] += per_request

    # Warm-up (loads the model), then measure.
    api.call("POST", "/v1/classifications", {"model": model, "images": images[:1]})
    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / (time.monotonic() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--molt", default=os.path.join(REPO, "target", "release", "molt"))
    ap.add_argument("--images", type=int, default=1500, help="images in the upload archive")
    ap.add_argument("--size", type=int, default=96, help="their side in pixels")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0, help="per classification figure")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="molt-vision-bench-")
    data = os.path.join(REPO, "corpus", "digits", "digits-5to9.zip")
    method = {"type": "lora", "targets": ["in_proj", "out_proj"], "r": 8}
    hyper = {"n_epochs": args.epochs, "batch_size": 32, "learning_rate": 1e-3, "eval_every": 10**6}
    port = free_port()
    env = dict(os.environ, MOLT_ADMIN_TOKEN="bench")
    for k in ("MOLT_DATABASE_URL", "MOLT_STORE", "MOLT_MODELS_DIR", "MOLT_DATA_DIR"):
        env.pop(k, None)
    server = subprocess.Popen(
        [args.molt, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", os.path.join(work, "data"),
         "--workers", "1", "--rate-limit-requests", "0"], env=env, stdout=open(os.path.join(work, "serve.log"), "w"),
        stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/readyz", timeout=1)
                break
            except Exception:
                time.sleep(0.2)
        key = open(os.path.join(work, "data", "first-key")).read().strip()
        api = Api(url, key)
        results = {"machine": subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
                                             capture_output=True, text=True).stdout.strip(),
                   "cores": os.cpu_count()}

        # 1. Upload validation.
        archive = os.path.join(work, "upload.zip")
        make_zip(archive, args.images, args.size)
        mb = os.path.getsize(archive) / 1e6
        t0 = time.monotonic()
        f = api.upload(archive)
        dt = time.monotonic() - t0
        assert f["status"] == "processed", f
        results["upload"] = {"images": args.images, "megabytes": round(mb, 1), "seconds": round(dt, 2),
                             "mb_per_s": round(mb / dt, 1), "images_per_s": round(args.images / dt, 0)}

        # 2. Training: the service against molt train.
        f = api.upload(data)
        job = api.call("POST", "/v1/fine_tuning/jobs",
                       {"model": "digits", "training_file": f["id"], "method": method,
                        "hyperparameters": hyper, "seed": 1})
        t0 = time.monotonic()
        j = api.wait(job["id"])
        service_wall = time.monotonic() - t0
        assert j["status"] == "succeeded", j
        metrics = api.call("GET", f"/v1/fine_tuning/jobs/{job['id']}/metrics?limit=10000")["data"]
        rates = [m["tokens_per_second"] for m in metrics if m.get("tokens_per_second")]
        service_rate = rates[-1] if rates else float("nan")
        model_dir = os.path.join(REPO, "models", "digits")
        t0 = time.monotonic()
        out = subprocess.run(
            [args.molt, "train", "--model", model_dir, "--train", data, "--method", json.dumps(method),
             "--hyper", json.dumps(dict(hyper, **{"warmup_ratio": 0.1, "lr_scheduler": "cosine",
                                                  "weight_decay": 1e-4, "max_grad_norm": 5.0})),
             "--seed", "1", "--out", os.path.join(work, "cli-adapter")],
            check=True, capture_output=True, text=True)
        cli_wall = time.monotonic() - t0
        steps = re.findall(r"([0-9.]+) img/s", out.stdout)
        cli_rate = float(steps[-1]) if steps else float("nan")
        results["training"] = {
            "steps": j["trained_tokens"] and len(metrics), "service_images_per_s": round(service_rate, 1),
            "molt_train_images_per_s": round(cli_rate, 1),
            "service_over_molt_train": round(service_rate / cli_rate, 3),
            "service_job_wall_s": round(service_wall, 1), "molt_train_wall_s": round(cli_wall, 1)}

        # 3. Classification, hot-swapped and merged.
        ft = j["fine_tuned_model"]
        merged = api.call("POST", f"/v1/adapters/{j['adapter_id']}/merge")["id"]
        with zipfile.ZipFile(data) as z:
            import base64
            images = [base64.b64encode(z.read(n)).decode() for n in z.namelist() if n.startswith("val/")]
        results["classification"] = {}
        for per in (1, 32):
            hot = classify_rate(api, ft, images, per, 4, args.seconds)
            mer = classify_rate(api, merged, images, per, 4, args.seconds)
            results["classification"][f"{per}_per_request"] = {
                "hot_swapped_images_per_s": round(hot, 1), "merged_images_per_s": round(mer, 1),
                "hot_over_merged": round(hot / mer, 3)}
        print(json.dumps(results, indent=2))
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
