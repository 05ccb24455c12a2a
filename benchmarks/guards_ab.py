"""Same-process A/B of the fused CPU tile wrapper (issue 15's guards): this tree's guarded tile_forward/backward
(B) against another tree's ``kernels/cpu_flash.py`` (A, e.g. the commit before the guards), interleaved A B A B,
median of N, dense.py's shapes (B=1, H=8, D=64).

    python benchmarks/guards_ab.py BASELINE_CPU_FLASH_PY [N] [THREADS]
"""
import importlib.util, statistics, sys, time, torch
import memattn
from memattn.kernels import cpu_flash
spec = importlib.util.spec_from_file_location("memattn.kernels._main_cpu_flash", sys.argv[1])
main_cf = importlib.util.module_from_spec(spec); spec.loader.exec_module(main_cf)
guarded = (cpu_flash.tile_forward, cpu_flash.tile_backward)
plain = (main_cf.tile_forward, main_cf.tile_backward)
def use(fns):
    cpu_flash.tile_forward, cpu_flash.tile_backward = fns
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
N = int(sys.argv[2]) if len(sys.argv) > 2 else 5
rows = []
for s in (1024, 2048):
    for dt in (torch.float32, torch.bfloat16):
        for causal in (False, True):
            for bwd in (False, True):
                q, k, v = (torch.randn(1, s, 8, 64).to(dt).requires_grad_(bwd) for _ in range(3))
                def run():
                    o = memattn.attention(q, k, v, causal=causal)
                    if bwd:
                        o.sum().backward()
                ta, tb = [], []
                for fns in (plain, guarded):
                    use(fns); run()  # warm-up
                for _ in range(N):
                    for fns, acc in ((plain, ta), (guarded, tb)):
                        use(fns); t = time.perf_counter(); run(); acc.append(time.perf_counter() - t)
                a, b = statistics.median(ta), statistics.median(tb)
                name = f"{'fwdbwd' if bwd else 'fwd'}-{'causal-' if causal else ''}S{s}-{'fp32' if dt == torch.float32 else 'bf16'}"
                rows.append((name, a, b))
                print(f"{name:<26} main {a*1e3:8.1f} ms  guarded {b*1e3:8.1f} ms  ratio {b/a:6.3f}", flush=True)
print("geomean ratio", statistics.geometric_mean([b / a for _, a, b in rows]))
