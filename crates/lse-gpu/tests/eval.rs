//! `lse-gpu eval` against `lse eval` (the workspace's `lse-cli`, built here when missing) on the
//! same files: the same output files (dtype descr, shape) and values within the bounds measured
//! on llvmpipe (docs/gpu.md; `tests/llvmpipe.rs` checks them against the library directly).

use std::path::{Path, PathBuf};
use std::process::Command;

use half::{bf16, f16};
use lse::DType;
use lse_gpu::GpuElement;
use lse_io::npy::{self, Bf16Descr, ReadOptions};
use lse_io::{NpyElement, TensorData};

/// The `lse` binary of the workspace: `cargo build --profile test --workspace --all-features
/// --bin lse`, the very build `cargo test --workspace --all-features` makes (so a no-op after
/// CI's workspace block), its path from cargo's JSON messages.
fn lse_binary() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let output = Command::new(cargo)
        // The workspace's features and the test profile, as `.ci/run`'s `cargo test --workspace
        // --all-features` built it: then nothing is rebuilt.
        .args([
            "build",
            "--quiet",
            "--profile",
            "test",
            "--workspace",
            "--all-features",
            "--bin",
            "lse",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["--message-format", "json"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "building lse-cli failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let key = "\"executable\":\"";
    let path = stdout
        .lines()
        .filter(|l| l.contains("\"name\":\"lse-cli\"") || l.contains("lse-cli"))
        .find_map(|l| {
            let start = l.find(key)? + key.len();
            let end = l[start..].find('"')? + start;
            Some(PathBuf::from(&l[start..end]))
        })
        .expect("cargo names the lse executable");
    assert!(path.exists(), "{}", path.display());
    path
}

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("lse-gpu-eval-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }
    fn at(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `program eval ARGS`, which must succeed.
fn run(program: &Path, prefix: &[&str], args: &[String]) {
    let output = Command::new(program)
        .args(prefix)
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{} {prefix:?} {args:?}: {}",
        program.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A deterministic row of logits: ordinary values, a `±1e4` row, masks.
fn logits(rows: usize, classes: usize) -> Vec<f64> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..rows * classes)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
            let (row, class) = (i / classes, i % classes);
            if class % 11 == 5 && row % 2 == 0 {
                f64::NEG_INFINITY
            } else {
                u * [6.0, 30.0, 1e4][row % 3]
            }
        })
        .collect()
}

/// The elements of a `.npy` file as f64, its descr and shape.
fn load(path: &Path) -> (Vec<f64>, String, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap();
    let t = npy::parse(&bytes, ReadOptions { void_as_bf16: true })
        .unwrap()
        .tensor;
    let shape = t.shape.clone();
    let values = match t.data {
        TensorData::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
        other => other.to_f64().unwrap(),
    };
    (values, t.stored_as, shape)
}

/// Units in the last place of `dtype` at `v` (its spacing; subnormal spacing below).
fn ulp(dtype: DType, v: f64) -> f64 {
    let (mantissa, min_exp) = match dtype {
        DType::F32 => (24, -126),
        DType::F16 => (11, -14),
        DType::BF16 => (8, -126),
        DType::F64 => (53, -1022),
    };
    let e = if v == 0.0 {
        min_exp
    } else {
        (v.abs().log2().floor() as i32).max(min_exp)
    };
    2f64.powi(e - (mantissa - 1))
}

/// `got` against `want`: equal (NaN and infinities alike) or within `ulps` of the dtype, or within
/// `slack(i)` in absolute terms.
fn compare(
    what: &str,
    dtype: DType,
    got: &[f64],
    want: &[f64],
    ulps: f64,
    slack: impl Fn(usize) -> f64,
) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if g == w || (g.is_nan() && w.is_nan()) {
            continue;
        }
        let err = (g - w).abs();
        assert!(
            err <= ulps * ulp(dtype, w) + slack(i),
            "{what}: element {i}: {g} vs lse eval's {w} ({} ulps)",
            err / ulp(dtype, w)
        );
    }
}

/// One dtype: the four ops (cross_entropy with every option and with none), class axis last and
/// in the middle, against `lse eval` on the same `.npy` file.
fn against_lse_eval<E: GpuElement + NpyElement>(descr_style: Bf16Descr) {
    let lse = lse_binary();
    let gpu = PathBuf::from(env!("CARGO_BIN_EXE_lse-gpu"));
    let dir = Dir::new(E::DTYPE.name());
    let (rows, classes) = (6usize, 257usize);
    let x = logits(rows, classes);
    let typed: Vec<E> = x.iter().map(|&v| E::from_f64(v)).collect();
    // Axis last: rows × classes. Axis 1 of (2, classes, 3): the same values, rearranged.
    let last = dir.at("x.npy");
    std::fs::write(
        &last,
        npy::encode(&[rows, classes], &typed, descr_style).unwrap(),
    )
    .unwrap();
    let mid = dir.at("x_mid.npy");
    let moved = lse_io::layout::move_last_to_axis(&typed, &[2, classes, 3], 1).unwrap();
    std::fs::write(
        &mid,
        npy::encode(&[2, classes, 3], &moved, descr_style).unwrap(),
    )
    .unwrap();
    let targets: Vec<i64> = (0..rows as i64)
        .map(|r| {
            if r == 3 {
                -100
            } else {
                (r * 37 + 1) % classes as i64
            }
        })
        .map(|t| if t >= 0 && t % 11 == 5 { t + 1 } else { t })
        .collect();
    let t_path = dir.at("t.npy");
    std::fs::write(
        &t_path,
        npy::encode(&[rows], &targets, Bf16Descr::Void).unwrap(),
    )
    .unwrap();
    let weights: Vec<f64> = (0..classes).map(|c| 0.5 + (c % 3) as f64).collect();
    let w_path = dir.at("w.npy");
    std::fs::write(
        &w_path,
        npy::encode(&[classes], &weights, Bf16Descr::Void).unwrap(),
    )
    .unwrap();
    let s = |p: &Path| p.display().to_string();
    let dtype = E::DTYPE;
    let (f32_ulps, half) = (4.0, dtype != DType::F32);
    let ce_options: Vec<Vec<String>> = vec![
        vec![],
        [
            "--reduction",
            "none",
            "--label-smoothing",
            "0.1",
            "--z-loss",
            "1e-4",
            "--softcap",
            "30",
            "--weights",
        ]
        .iter()
        .map(|v| v.to_string())
        .chain([s(&w_path)])
        .collect(),
        ["--reduction", "sum", "--non-finite", "propagate"]
            .iter()
            .map(|v| v.to_string())
            .collect(),
    ];
    for (input, axis) in [(&last, "-1"), (&mid, "1")] {
        // The row maximum and the logits of each element, in the input's layout, for the
        // allowance of `x − m` rounded in f32 (docs/gpu.md).
        let (xin, _, _) = load(input);
        let stride_info = if axis == "1" {
            (classes, 3)
        } else {
            (classes, 1)
        };
        let row_max = |i: usize| {
            let (k, inner) = stride_info;
            let (outer, within) = (i / (k * inner), i % inner);
            (0..k)
                .map(|c| xin[outer * k * inner + c * inner + within])
                .fold(f64::NEG_INFINITY, f64::max)
        };
        for op in ["logsumexp", "softmax", "log_softmax"] {
            let (a, b) = (dir.at("a.npy"), dir.at("b.npy"));
            let args = |out: &Path| {
                vec![
                    "--op".into(),
                    op.into(),
                    s(input),
                    "--axis".into(),
                    axis.into(),
                    "--out".into(),
                    s(out),
                ]
            };
            run(&lse, &["eval"], &args(&a));
            run(&gpu, &["eval"], &args(&b));
            let (want, wd, ws) = load(&a);
            let (got, gd, gs) = load(&b);
            assert_eq!((&gd, &gs), (&wd, &ws), "{op}: descr and shape");
            let what = format!("{dtype:?} {op} axis {axis}");
            match op {
                "logsumexp" => compare(&what, DType::F32, &got, &want, 4.0, |_| 0.0),
                "softmax" if !half => compare(&what, dtype, &got, &want, f32_ulps, |i| {
                    (row_max(i) - xin[i]).abs() * 2f64.powi(-24) * want[i].abs()
                }),
                "log_softmax" if !half => compare(&what, dtype, &got, &want, f32_ulps, |_| 0.0),
                _ => compare(&what, dtype, &got, &want, 1.0, |_| 0.0),
            }
        }
        for options in &ce_options {
            let (a, b, ga, gb) = (
                dir.at("a.npy"),
                dir.at("b.npy"),
                dir.at("ga.npy"),
                dir.at("gb.npy"),
            );
            // Axis 1 of (2, K, 3): six rows in the row-major order of the other axes.
            let targets = s(&t_path);
            let args = |out: &Path, grad: &Path| {
                let mut v: Vec<String> = vec![
                    "--op".into(),
                    "cross_entropy".into(),
                    s(input),
                    "--axis".into(),
                    axis.into(),
                    "--targets".into(),
                    targets.clone(),
                    "--out".into(),
                    s(out),
                    "--grad".into(),
                    s(grad),
                ];
                v.extend(options.iter().cloned());
                v
            };
            run(&lse, &["eval"], &args(&a, &ga));
            run(&gpu, &["eval"], &args(&b, &gb));
            let what = format!("{dtype:?} cross_entropy axis {axis} {options:?}");
            let (want, wd, ws) = load(&a);
            let (got, gd, gs) = load(&b);
            assert_eq!((&gd, &gs), (&wd, &ws), "{what}: loss descr and shape");
            // The loss: 4e-7 relative (docs/gpu.md).
            compare(&what, DType::F32, &got, &want, 0.0, |i| {
                4e-7 * want[i].abs()
            });
            let (want, wd, ws) = load(&ga);
            let (got, gd, gs) = load(&gb);
            assert_eq!((&gd, &gs), (&wd, &ws), "{what}: gradient descr and shape");
            // The gradient: 16 ulps (f32) or 1 (f16/bf16) beyond 8 ulps of the largest value.
            let largest = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let floor = 8.0 * ulp(dtype, largest);
            compare(
                &format!("{what} gradient"),
                dtype,
                &got,
                &want,
                if half { 1.0 } else { 16.0 },
                |_| floor,
            );
        }
    }
}

#[test]
fn eval_f32_matches_lse_eval() {
    against_lse_eval::<f32>(Bf16Descr::Void);
}

#[test]
fn eval_f16_matches_lse_eval() {
    against_lse_eval::<f16>(Bf16Descr::Void);
}

#[test]
fn eval_bf16_matches_lse_eval() {
    // bf16 written with the 'bfloat16' descr: the outputs keep it.
    against_lse_eval::<bf16>(Bf16Descr::Named);
}

/// Errors are `lse eval`'s: a NaN logit names its row and column (exit status 2, nothing
/// written), in the whole tensor's rows.
#[test]
fn eval_errors_name_the_row() {
    let gpu = PathBuf::from(env!("CARGO_BIN_EXE_lse-gpu"));
    let dir = Dir::new("errors");
    let mut x = vec![0.5f32; 12];
    x[2 * 4 + 1] = f32::NAN;
    let input = dir.at("x.npy");
    std::fs::write(&input, npy::encode(&[3, 4], &x, Bf16Descr::Void).unwrap()).unwrap();
    let out = dir.at("out.npy");
    let output = Command::new(&gpu)
        .args(["eval", "--op", "softmax"])
        .arg(&input)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("row 2") && stderr.contains("column 1"),
        "{stderr}"
    );
    assert!(!out.exists(), "an output was written on error");
    // A cross-entropy flag on another op is a usage error, as in lse eval.
    let output = Command::new(&gpu)
        .args(["eval", "--op", "softmax", "--z-loss", "1e-4"])
        .arg(&input)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr)
        .contains("--z-loss applies to --op cross_entropy only"));
}

/// A `.safetensors` file of `(name, dtype, shape, little-endian bytes)` tensors.
fn safetensors(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut offset = 0;
    let entries: Vec<String> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let shape: Vec<String> = shape.iter().map(ToString::to_string).collect();
            let entry = format!(
                "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{offset},{}]}}",
                shape.join(","),
                offset + bytes.len()
            );
            offset += bytes.len();
            entry
        })
        .collect();
    let mut header = format!("{{{}}}", entries.join(",")).into_bytes();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header);
    for (_, _, _, bytes) in tensors {
        file.extend(bytes);
    }
    file
}

/// A `.safetensors` input with two float tensors: `--tensor` picks one, as in `lse eval`; a
/// BF16 tensor's outputs are described as `'<V2'`, as `lse eval` writes them.
#[test]
fn eval_safetensors_input() {
    let lse = lse_binary();
    let gpu = PathBuf::from(env!("CARGO_BIN_EXE_lse-gpu"));
    let dir = Dir::new("safetensors");
    let (rows, classes) = (4usize, 50usize);
    let x = logits(rows, classes);
    let as_bf16: Vec<u8> = x
        .iter()
        .flat_map(|&v| bf16::from_f64(v).to_le_bytes())
        .collect();
    let as_f32: Vec<u8> = x.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect();
    let input = dir.at("x.safetensors");
    std::fs::write(
        &input,
        safetensors(&[
            ("logits", "BF16", vec![rows, classes], as_bf16),
            ("other", "F32", vec![rows, classes], as_f32),
        ]),
    )
    .unwrap();
    for op in ["softmax", "logsumexp"] {
        let (a, b) = (dir.at("a.npy"), dir.at("b.npy"));
        let args = |out: &Path| {
            vec![
                "--op".to_string(),
                op.into(),
                input.display().to_string(),
                "--tensor".into(),
                "logits".into(),
                "--out".into(),
                out.display().to_string(),
            ]
        };
        run(&lse, &["eval"], &args(&a));
        run(&gpu, &["eval"], &args(&b));
        let (want, wd, ws) = load(&a);
        let (got, gd, gs) = load(&b);
        assert_eq!((&gd, &gs), (&wd, &ws), "{op}: descr and shape");
        if op == "softmax" {
            assert_eq!(gd, "<V2");
            compare(op, DType::BF16, &got, &want, 1.0, |_| 0.0);
        } else {
            compare(op, DType::F32, &got, &want, 4.0, |_| 0.0);
        }
    }
    // Without --tensor, two float tensors are a usage error.
    let output = Command::new(&gpu)
        .args(["eval", "--op", "softmax"])
        .arg(&input)
        .arg("--out")
        .arg(dir.at("c.npy"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--tensor"));
}
