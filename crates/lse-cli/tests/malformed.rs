//! Malformed inputs: every one gives a one-line error on stderr and exit status 2 — no panic, no
//! huge allocation — for `lse audit` and `lse eval` alike. The files are built by hand, byte by
//! byte, in a temporary directory.

use std::path::{Path, PathBuf};

use lse_io::npy::{encode, Bf16Descr};

mod common;

use common::{lse, s, safetensors_file as st};

/// A fresh, empty directory for one test.
fn dir(test: &str) -> PathBuf {
    common::dir("malformed", test)
}

/// A `.npy` file (version 1.0) with the header dict `dict` and the bytes `data`.
fn npy(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut header = dict.to_owned();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn f4(shape: &str) -> String {
    format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}")
}

/// Runs `lse ARGS`: exit status 2, nothing on stdout, one line on stderr that contains `want`
/// and no panic.
fn fails(args: &[&str], want: &str) {
    let err = common::run_err(args);
    assert!(err.starts_with("error: "), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert!(
        err.contains(want),
        "{args:?}: {err:?} does not contain {want:?}"
    );
}

/// Writes `bytes` as `name` and checks that both `lse audit` and `lse eval` reject it with
/// `want`.
fn rejected(d: &Path, name: &str, bytes: &[u8], want: &str) {
    let path = d.join(name);
    std::fs::write(&path, bytes).unwrap();
    fails(&["audit", s(&path)], want);
    fails(&["audit", s(&path), "--json"], want);
    let out = d.join("out.npy");
    fails(
        &["eval", "--op", "softmax", s(&path), "--out", s(&out)],
        want,
    );
    assert!(!out.exists(), "nothing written for {name}");
}

#[test]
fn npy_truncated() {
    let d = dir("npy_truncated");
    let good = npy(&f4("(2, 3)"), &[0; 24]);
    rejected(
        &d,
        "empty.npy",
        &[],
        "truncated file: the magic string and version needs 8 bytes, the file has 0",
    );
    rejected(&d, "magic.npy", &good[..4], "truncated file");
    rejected(
        &d,
        "len.npy",
        &good[..9],
        "truncated file: the header length needs 10 bytes",
    );
    rejected(
        &d,
        "header.npy",
        &good[..40],
        "truncated file: the header needs 128 bytes, the file has 40",
    );
    rejected(
        &d,
        "data.npy",
        &good[..good.len() - 1],
        "shape (2, 3) of '<f4': the header declares 24 bytes of data, the file holds 23",
    );
    rejected(
        &d,
        "nodata.npy",
        &good[..128],
        "the header declares 24 bytes of data, the file holds 0",
    );
}

#[test]
fn npy_wrong_magic_version_and_header() {
    let d = dir("npy_header");
    let mut bad_magic = npy(&f4("(1,)"), &[0; 4]);
    bad_magic[1] = b'X';
    rejected(
        &d,
        "magic.npy",
        &bad_magic,
        "not a .npy file: it starts with b\"\\x93XUMPY",
    );
    rejected(&d, "zip.npy", b"PK\x03\x04 not npy", "not a .npy file");
    let mut version = npy(&f4("(1,)"), &[0; 4]);
    version[6] = 4;
    rejected(
        &d,
        "version.npy",
        &version,
        "unsupported .npy format version 4.0",
    );
    for (dict, want) in [
        ("[1, 2]", "the header is a list, not a dict"),
        ("{'descr': '<f4', 'fortran_order': False}", "no \"shape\" key"),
        ("{'descr': '<f4', 'shape': (1,)}", "no \"fortran_order\" key"),
        ("{'fortran_order': False, 'shape': (1,)}", "no \"descr\" key"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'extra': 1}", "unexpected key \"extra\""),
        ("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,)}", "appears twice"),
        ("{'descr': '<f4', 'fortran_order': 0, 'shape': (1,)}", "'fortran_order' is an integer"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': [1]}", "'shape' is a list, not a tuple"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 'a')}", "a dimension is a string"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}", "dimension -1 is negative"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)", "expected ',' or '}'"),
        ("{'descr': '<f4, 'fortran_order': False, 'shape': (1,)}", "expected ',' or '}' at byte 17 of the header"),
        ("{'descr': '<f4', 'fortran_order': Maybe, 'shape': (1,)}", "unexpected name \"Maybe\""),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)} trailing", "unexpected text after the dict"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999999999999999999999,)}", "too large"),
    ] {
        rejected(&d, "h.npy", &npy(dict, &[0; 4]), want);
    }
    let deep = format!("{}{}", "(".repeat(500), ")".repeat(500));
    rejected(&d, "deep.npy", &npy(&deep, &[]), "nesting too deep");
    let mut v3 = npy(&f4("(1,)"), &[0; 4]);
    v3[6] = 3;
    // Version 3 has a 4-byte length: the same bytes now declare a header far past the end.
    rejected(&d, "v3.npy", &v3, "truncated file: the header needs");
    let mut utf8 = b"\x93NUMPY\x03\x00".to_vec();
    utf8.extend_from_slice(&4u32.to_le_bytes());
    utf8.extend_from_slice(&[b'{', 0xff, b'}', b'\n']);
    rejected(&d, "utf8.npy", &utf8, "malformed npy header: not UTF-8");
}

#[test]
fn npy_unknown_or_non_float_dtypes() {
    let d = dir("npy_dtype");
    let header =
        |descr: &str| format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (2,), }}");
    for (descr, size, want) in [
        (
            "<x4",
            8,
            "unsupported element type \"<x4\": unknown type code",
        ),
        ("<f16", 32, "floats of 2, 4 or 8 bytes are supported"),
        ("<f3", 6, "floats of 2, 4 or 8 bytes"),
        ("<c8", 16, "complex numbers"),
        ("|b1", 2, "booleans"),
        ("<U4", 32, "strings"),
        ("|O", 16, "not a simple NumPy type code"),
        ("|V4", 8, "opaque (void) data"),
        ("<M8[ns]", 16, "not a simple NumPy type code"),
        ("", 0, "empty type code"),
        ("<V2", 4, "\"<V2\" is 2-byte opaque data"),
        (
            "<i4",
            8,
            "logits must be floats (f64, f32, f16, bf16), but the elements are \"<i4\"",
        ),
        ("|u1", 2, "logits must be floats"),
    ] {
        rejected(&d, "t.npy", &npy(&header(descr), &vec![0; size]), want);
    }
    let structured =
        "{'descr': [('a', '<f4'), ('b', '<f4')], 'fortran_order': False, 'shape': (2,), }";
    rejected(&d, "s.npy", &npy(structured, &[0; 16]), "structured arrays");
}

#[test]
fn npy_shape_and_size_mismatch() {
    let d = dir("npy_size");
    rejected(
        &d,
        "more.npy",
        &npy(&f4("(2, 3)"), &[0; 28]),
        "declares 24 bytes of data, the file holds 28",
    );
    rejected(
        &d,
        "less.npy",
        &npy(&f4("(2, 3)"), &[0; 20]),
        "declares 24 bytes of data, the file holds 20",
    );
    rejected(
        &d,
        "zero.npy",
        &npy(&f4("(0, 3)"), &[0; 4]),
        "declares 0 bytes of data, the file holds 4",
    );
}

#[test]
fn npy_huge_declared_shapes_do_not_allocate() {
    let d = dir("npy_huge");
    // 2^80 elements: overflows usize.
    rejected(
        &d,
        "overflow.npy",
        &npy(&f4("(1099511627776, 1099511627776)"), &[0; 16]),
        "shape (1099511627776, 1099511627776) of 4-byte elements is larger than this machine can address",
    );
    // 2^60 bytes: fits usize, but the file holds 16.
    rejected(
        &d,
        "huge.npy",
        &npy(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (1073741824, 134217728), }",
            &[0; 16],
        ),
        "declares 1152921504606846976 bytes of data, the file holds 16",
    );
    rejected(
        &d,
        "ndim.npy",
        &npy(
            &format!(
                "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}), }}",
                "1, ".repeat(65)
            ),
            &[0; 4],
        ),
        "more than NumPy's 64",
    );
}

/// Zero elements next to huge dimensions are a valid, empty array: nothing loops over the huge
/// dimensions (moving the class axis included), and the outputs keep the shape.
#[test]
fn empty_arrays_with_huge_dimensions() {
    let d = dir("empty_huge");
    let path = d.join("e.npy");
    std::fs::write(&path, npy(&f4("(1099511627776, 3, 0)"), &[])).unwrap();
    for axis in ["0", "1", "2"] {
        let out = lse()
            .args(["audit", s(&path), "--axis", axis, "--json"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if axis == "1" {
            assert_eq!(out.status.code(), Some(0), "{err}");
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["tensors"][0]["rows"], 0);
        } else {
            // Axis 0 has 2^40 classes of 0 rows (fine); axis 2 has no classes (an error).
            let want = if axis == "0" { Some(0) } else { Some(2) };
            assert_eq!(out.status.code(), want, "axis {axis}: {err}");
        }
    }
    let out = d.join("p.npy");
    lse()
        .args([
            "eval",
            "--op",
            "softmax",
            s(&path),
            "--axis",
            "1",
            "--out",
            s(&out),
        ])
        .assert()
        .success();
    let bytes = std::fs::read(&out).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("'shape': (1099511627776, 3, 0)"), "{text}");
}

/// With the address space limited to 1 GiB, a file that declares 8 GiB of data is still a clean
/// error: the reader never tries to allocate what the header declares.
#[cfg(target_os = "linux")]
#[test]
fn declared_sizes_are_never_allocated_under_a_memory_limit() {
    let d = dir("ulimit");
    // 2^30 f64 = 8 GiB declared, 16 bytes present.
    let path = d.join("big.npy");
    std::fs::write(
        &path,
        npy(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (1073741824,), }",
            &[0; 16],
        ),
    )
    .unwrap();
    let st_path = d.join("big.safetensors");
    std::fs::write(
        &st_path,
        st(
            r#"{"x":{"dtype":"F64","shape":[1073741824],"data_offsets":[0,8589934592]}}"#,
            &[0; 16],
        ),
    )
    .unwrap();
    for file in [&path, &st_path] {
        let script = format!(
            "ulimit -v 1048576 && exec '{}' audit '{}'",
            env!("CARGO_BIN_EXE_lse"),
            file.display()
        );
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn safetensors_malformed() {
    let d = dir("safetensors");
    let good_header = r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let good = st(good_header, &[0; 8]);
    rejected(
        &d,
        "short.safetensors",
        &good[..5],
        "truncated file: the 8-byte header length needs 8 bytes, the file has 5",
    );
    rejected(
        &d,
        "cut.safetensors",
        &good[..20],
        "the header length 54 is larger than the rest of the file (12 bytes)",
    );
    let mut huge_len = good.clone();
    huge_len[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    rejected(
        &d,
        "len.safetensors",
        &huge_len,
        "the header length 18446744073709551615 is larger than the rest of the file",
    );
    for (header, data, want) in [
        ("{not json", 0, "malformed safetensors header: invalid JSON"),
        ("[1, 2]", 0, "the header is not a JSON object"),
        (r#"{"x": 3}"#, 0, "tensor \"x\": invalid type: integer `3`"),
        (r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}}"#, 8, "tensor \"x\": data_offsets [0, 16] lie outside the data section (8 bytes)"),
        (r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#, 8, "end before they begin"),
        (r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, 8, "should begin at 8"),
        (r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, 8, "should begin at 0"),
        (r#"{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8, "hold 8 bytes, but shape (3,) of F32 takes 12"),
        (r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, 8, "data section: the header declares 4 bytes of data, the file holds 8"),
        (r#"{"x":{"dtype":"F31","shape":[2],"data_offsets":[0,8]}}"#, 8, "tensor \"x\" has unknown dtype \"F31\""),
        (r#"{"x":{"dtype":3,"shape":[2],"data_offsets":[0,8]}}"#, 8, "tensor \"x\": invalid type: integer `3`, expected string or map"),
        (r#"{"x":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}}"#, 8, "tensor \"x\": invalid type: floating point `2.5`"),
        (r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0]}}"#, 8, "tensor \"x\": invalid length 1"),
        (r#"{"x":{"shape":[2],"data_offsets":[0,8]}}"#, 8, "tensor \"x\": missing field `dtype`"),
        (r#"{"x":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,8]}}"#, 8, "larger than this machine can address"),
        (r#"{"__metadata__":{"a":1},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 8, "metadata \"a\" is not a string"),
        (r#"{"x":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#, 2, "not a whole number of bytes"),
        (r#"{"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#, 8, "no float tensor (F64, F32, F16, BF16) to use as logits; the file holds \"ids\" (I64 (1,))"),
        ("{}", 0, "no float tensor (F64, F32, F16, BF16) to use as logits; the file holds no tensor at all"),
    ] {
        rejected(&d, "h.safetensors", &st(header, &vec![0; data]), want);
    }
    let mut bad_utf8 = st("{\"x\":1}", &[]);
    bad_utf8[9] = 0xff;
    rejected(
        &d,
        "utf8.safetensors",
        &bad_utf8,
        "malformed safetensors header: not UTF-8",
    );
    // A tensor of a dtype lse cannot use, asked for by name.
    let f8 = st(
        r#"{"q":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}"#,
        &[0; 2],
    );
    let path = d.join("f8.safetensors");
    std::fs::write(&path, f8).unwrap();
    fails(
        &["audit", s(&path), "--tensor", "q"],
        "unsupported element type \"F8_E4M3\"",
    );
    fails(&["audit", s(&path)], "no float tensor");
}

#[test]
fn targets_malformed() {
    let d = dir("targets");
    let logits = d.join("x.npy");
    std::fs::write(
        &logits,
        encode(&[3, 2], &[0.0f32; 6], Bf16Descr::Void).unwrap(),
    )
    .unwrap();
    let write = |name: &str, bytes: Vec<u8>| {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let out = d.join("out.npy");
    let cases = [
        (write("range.npy", encode(&[3], &[0i64, 2, 1], Bf16Descr::Void).unwrap()), "target 2 at row 1 is out of range for 2 classes (valid: 0 to 1; the ignore index is -100)"),
        (write("neg.npy", encode(&[3], &[0i64, -1, 1], Bf16Descr::Void).unwrap()), "target -1 at row 1 is out of range"),
        (write("long.npy", encode(&[4], &[0i64; 4], Bf16Descr::Void).unwrap()), "4 targets (shape (4,)) for 3 rows: the logits have shape (3, 2), class axis 1"),
        (write("short.npy", encode(&[2], &[0i32; 2], Bf16Descr::Void).unwrap()), "2 targets (shape (2,)) for 3 rows"),
        (write("float.npy", encode(&[3], &[0.0f32; 3], Bf16Descr::Void).unwrap()), "targets must be integer class indices, but the elements are \"<f4\""),
        (write("trunc.npy", encode(&[3], &[0i64; 3], Bf16Descr::Void).unwrap()[..134].to_vec()), "the header declares 24 bytes of data, the file holds 6"),
        (write("junk.npy", b"junk".to_vec()), "not a .npy file"),
        (write("t.safetensors", st("{}", &[])), "targets must be a .npy file"),
        (write("big.npy", npy("{'descr': '<u8', 'fortran_order': False, 'shape': (3,), }", &[0xff; 24])), "element 0 is 18446744073709551615, larger than the largest i64"),
        (d.join("missing.npy"), "cannot read"),
    ];
    for (targets, want) in &cases {
        fails(&["audit", s(&logits), "--targets", s(targets)], want);
        fails(
            &[
                "eval",
                "--op",
                "cross_entropy",
                s(&logits),
                "--targets",
                s(targets),
                "--out",
                s(&out),
            ],
            want,
        );
        assert!(!out.exists());
    }
}

/// A file that shrinks while it is being read (another process truncates a dump that `lse audit`
/// is reading) gives an error naming the bytes missing, not a crash: the reader uses positioned
/// reads, which come back short, where a memory mapping would raise SIGBUS.
#[test]
fn a_file_that_shrinks_while_being_read_is_an_error_not_a_crash() {
    use lse_io::npy::ReadOptions;
    use lse_io::stream::{ReadError, TensorFile};
    use lse_io::{Format, TensorData};

    let d = dir("shrinks");
    let path = d.join("logits.npy");
    let values: Vec<f32> = (0..4096).map(|i| i as f32).collect();
    std::fs::write(&path, encode(&[64, 64], &values, Bf16Descr::Named).unwrap()).unwrap();
    let file = TensorFile::open(&path, Format::Npy, ReadOptions::default()).unwrap();
    let tensor = file.tensors[0].clone();
    let mut buf = Vec::new();
    let first = file.read(&tensor, 0, 64, &mut buf).unwrap();
    assert_eq!(first, TensorData::F32(values[..64].to_vec()));

    // Truncated to half while open: the first half still reads, the second half is an error.
    let opened_with = file.len;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(opened_with / 2)
        .unwrap();
    assert!(file.read(&tensor, 64, 64, &mut buf).is_ok());
    let err = file.read(&tensor, 4032, 64, &mut buf).unwrap_err();
    assert!(
        matches!(err, ReadError::Shrunk { needed, opened_with: o } if needed == opened_with && o == opened_with),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("the file shrank while being read"),
        "{err}"
    );
}
