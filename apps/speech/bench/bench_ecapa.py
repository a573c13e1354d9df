"""CPU embedding throughput of attn-speech's ECAPA-TDNN against SpeechBrain's, same weights.

Both systems embed the same waveforms from raw audio (filterbanks, sentence mean
normalisation, ECAPA-TDNN) in inference mode with the same number of threads; timings are
interleaved and repeated; throughput is seconds of audio per second (median over passes)
and the speed-up is the median over passes of each pass's ratio to SpeechBrain's. On a
shared machine other jobs inflate whole passes unevenly, so the speed-up is also given from
each system's best time per file (or batch) summed over the files: the run least disturbed
by other jobs, the usual estimate of a program's own time (``timeit``'s minimum).

    python apps/speech/bench/bench_ecapa.py [--channels 1024] [--threads 2] [--repeats 5]
        [--seconds 2 8]
    OMP_NUM_THREADS=1 python apps/speech/bench/bench_ecapa.py --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from speechbrain.lobes.features import Fbank as SBFbank
from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN
from speechbrain.processing.features import InputNormalization

from attn_speech.ecapa.config import EcapaConfig
from attn_speech.ecapa.inference import Embedder, pad_batch
from attn_speech.ecapa.speaker import EcapaSpeaker


def speechbrain_system(channels: int):
    torch.manual_seed(0)
    model = ECAPA_TDNN(80, channels=[channels] * 4 + [3 * channels], lin_neurons=192).eval()
    with torch.no_grad():
        for m in model.modules():  # trained-looking BatchNorm statistics
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    fbank = SBFbank(n_mels=80)
    norm = InputNormalization(norm_type="sentence", std_norm=False)

    @torch.inference_mode()
    def embed(wavs: list[torch.Tensor]) -> torch.Tensor:
        batch, lengths = pad_batch(wavs)
        lengths = lengths.float()
        feats = norm(fbank(batch), lengths)
        return model(feats, lengths)[:, 0]

    return model, embed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=int, default=1024, help="C (1024: spkrec-ecapa-voxceleb)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--files", type=int, default=12, help="utterances per pass (default: 12)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per system (default: 5)")
    p.add_argument(
        "--seconds",
        type=float,
        nargs=2,
        default=(2.0, 8.0),
        metavar=("SHORTEST", "LONGEST"),
        help="utterance lengths, evenly spaced between the two (default: 2 8)",
    )
    p.add_argument(
        "--per-file",
        action="store_true",
        help="also print each utterance's best time, one file at a time, for SpeechBrain and "
        "FastEcapa fp32",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time the reference network under torch.compile (inductor with weight "
        "freezing, dynamic lengths); its first call compiles for tens of seconds",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time, which other jobs on a shared "
        "machine do not inflate (use with --threads 1) (default: wall)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(1)
    seconds = torch.linspace(*args.seconds, args.files).tolist()
    wavs = [0.1 * torch.randn(int(s * 16000), generator=gen) for s in seconds]
    total = sum(seconds)

    sb_model, sb_embed = speechbrain_system(args.channels)
    c = args.channels
    ours = EcapaSpeaker(model=EcapaConfig(channels=(c, c, c, c, 3 * c))).eval()
    ours.embedding_model.load_state_dict(sb_model.state_dict())
    fast = Embedder(ours, batch_size=1)
    reference = Embedder(ours, batch_size=1, fast=False)
    bf16 = Embedder(ours, batch_size=1, precision="bf16")

    def per_file(embed):
        return [lambda w=w: embed([w]) for w in wavs]

    def batched(embed, size=4):
        order = sorted(range(len(wavs)), key=lambda i: wavs[i].numel())
        groups = [[wavs[i] for i in order[k : k + size]] for k in range(0, len(order), size)]
        return [lambda g=g: embed(g) for g in groups]

    systems = {
        "SpeechBrain, one file at a time": per_file(sb_embed),
        "attn-speech reference, one file at a time": per_file(reference.embed_waveforms),
        "attn-speech fast, one file at a time": per_file(fast.embed_waveforms),
        "attn-speech fast bf16, one file at a time": per_file(bf16.embed_waveforms),
        "SpeechBrain, length-sorted batches of 4": batched(sb_embed),
        "attn-speech fast, length-sorted batches of 4": batched(fast.embed_waveforms),
    }
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        compiled = Embedder(ours, batch_size=1, fast=False)
        compiled.net = torch.compile(compiled.net, dynamic=True)
        with torch.inference_mode():
            start = time.perf_counter()
            compiled.embed_waveforms(wavs[:1])
        print(f"torch.compile: first call {time.perf_counter() - start:.1f} s")
        systems["attn-speech reference + torch.compile, one file at a time"] = per_file(
            compiled.embed_waveforms
        )
    with torch.inference_mode():
        diff = max(
            float((sb_embed([w])[0] - fast.embed_waveforms([w])[0]).abs().max()) for w in wavs[:3]
        )
        cos_bf16 = min(
            float(
                torch.nn.functional.cosine_similarity(
                    fast.embed_waveforms([w])[0], bf16.embed_waveforms([w])[0], dim=0
                )
            )
            for w in wavs[:3]
        )
        for units in systems.values():  # warm-up
            for unit in units:
                unit()
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        # unit_times[name][r][i]: pass r, file (or batch) i
        unit_times: dict[str, list[list[float]]] = {k: [] for k in systems}
        for _ in range(args.repeats):
            for name, units in systems.items():
                row = []
                for unit in units:
                    start = clock()
                    unit()
                    row.append(clock() - start)
                unit_times[name].append(row)

    if args.per_file:
        base = [min(col) for col in zip(*unit_times["SpeechBrain, one file at a time"])]
        ours_best = [min(col) for col in zip(*unit_times["attn-speech fast, one file at a time"])]
        print("| utterance | SpeechBrain | attn-speech fast | speed-up |\n|---:|---:|---:|---:|")
        for length, sb_t, fast_t in zip(seconds, base, ours_best):
            cells = f"{length:.2f} s | {sb_t * 1e3:.1f} ms | {fast_t * 1e3:.1f} ms"
            print(f"| {cells} | {sb_t / fast_t:.2f}x |")
        print()
    times = {k: [sum(row) for row in v] for k, v in unit_times.items()}
    best = {k: sum(min(col) for col in zip(*v)) for k, v in unit_times.items()}
    speed = {k: total / statistics.median(v) for k, v in times.items()}
    print(
        f"ECAPA-TDNN C={c}, {args.files} utterances of {args.seconds[0]:g}-{args.seconds[1]:g} s "
        f"({total:.0f} s of audio), "
        f"{args.threads} threads, {args.repeats} interleaved passes, {args.clock} clock"
    )
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"max |embedding difference| SpeechBrain vs ours (fp32): {diff:.2e}")
    print(f"min cosine of bf16 vs fp32 embeddings: {cos_bf16:.6f}\n")
    print(
        "| system | audio s / s (median) | vs SpeechBrain: median of passes (range) "
        "| vs SpeechBrain: best times |"
    )
    print("|---|---:|---:|---:|")
    for name, value in speed.items():
        base = "SpeechBrain, " + name.split(", ", 1)[1]
        # The ratio of each pass to SpeechBrain's pass next to it, which cancels slow
        # changes of the machine's load.
        ratios = [b / t for t, b in zip(times[name], times[base])]
        spread = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        print(f"| {name} | {value:.1f} | {spread} | {best[base] / best[name]:.2f}x |")


if __name__ == "__main__":
    main()
