"""Do the local branches learn where findings are? Trains methods x seeds in the blob world and tabulates grounding.

  python launch/localization_study.py --out=runs/blobs_study --steps=600 --seeds=0,1,2 \
      --methods=convirt,gloria,mgca,mgca:local_negatives=batch,sista,aga,plan
  python launch/localization_study.py --out=runs/blobs_study --steps=600 --seeds=0,1,2 --methods=... --table_only
  python launch/localization_study.py --out=runs/blobs_curve --steps=600 --every=50 --seeds=0 --methods=sista,aga

The blob world is prepared in --data (default <out>/data) unless it is there. Every (method, seed) is a
pretraining workdir <out>/<label>_s<seed> with eval/grounding.json (and eval/grounding_untrained.json, the same
architecture at initialisation); finished ones are skipped, so a killed study resumes where it stopped. The
Markdown table (mean ± sample SD over the seeds) is printed and written to <out>/results.md. With --every=K each
run keeps a checkpoint every K steps and its grounding is scored at step 0 (initialisation), every K steps and
at the end (eval/grounding_curve.jsonl; one table per setting after the main one). What the columns are:
medvlp_jax/localization_study.py and medvlp_jax/evaluators/grounding.py.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from medvlp_jax.app import ArgumentParser
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="study directory (one workdir per method and seed)")
    p.add_argument("--methods", default="convirt,gloria,mgca,sista,aga,plan",
                   help="comma-separated specs name[:field=value[+field=value]] (config.method fields)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--steps", type=int, default=600, help="training steps per run (32 steps = 1 epoch)")
    p.add_argument("--data", default="", help="blob world directory (default <out>/data)")
    p.add_argument("--no_untrained", action="store_true", help="skip the untrained baselines")
    p.add_argument("--every", type=int, default=0,
                   help="also score grounding every this many steps (a checkpoint each; 0 = only at the end)")
    p.add_argument("--table_only", action="store_true", help="train nothing; tabulate the results there are")
    a = p.parse_args(argv)
    from medvlp_jax import config_lib, localization_study as study
    try:
        specs = [study.parse_spec(s) for s in a.methods.split(",") if s]
        seeds = [int(s) for s in a.seeds.split(",") if s]
    except ValueError as e:
        p.error(str(e))
    if a.steps < 1 or not specs or not seeds:
        p.error("--steps must be >= 1 and --methods, --seeds non-empty")
    if not 0 <= a.every <= a.steps:
        p.error(f"--every={a.every}: must be between 0 (no curve) and --steps={a.steps}")
    data = a.data or os.path.join(a.out, "data")
    if not a.table_only:
        from medvlp_jax import app as app_lib
        runs = []
        try:                 # every config first: a misspelt method or field fails before any training
            for spec in specs:
                base = config_lib.repo_config(spec.method, "test")
                runs += [(study.study_config(base, data, steps=a.steps, seed=seed, method_fields=spec.fields,
                                             every=a.every),
                          os.path.join(a.out, f"{spec.label}_s{seed}")) for seed in seeds]
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))

        def body():
            study.prepare_world(data)
            for config, workdir in runs:
                study.run_setting(config, workdir, untrained=not a.no_untrained, every=a.every)

        app_lib.run_main(body)
    md = study.markdown_table(study.study_rows(a.out, specs, seeds, a.steps, untrained=not a.no_untrained))
    if a.every:
        for spec in specs:
            curves = [study.read_curve(os.path.join(a.out, f"{spec.label}_s{seed}")) for seed in seeds]
            md += "\n\n" + study.curve_table(spec.label, [c for c in curves if c])
    print(md)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
