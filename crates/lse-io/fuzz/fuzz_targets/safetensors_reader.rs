//! The safetensors reader on arbitrary bytes: it must never panic or allocate more than the input
//! holds; every tensor it accepts decodes to its shape's element count; and it agrees with the
//! reference implementation (the `safetensors` crate) on which files are valid and what their
//! tensors hold.

#![no_main]

use libfuzzer_sys::fuzz_target;
use lse_io::safetensors;

fuzz_target!(|bytes: &[u8]| {
    let mine = safetensors::parse(bytes);
    let reference = ::safetensors::SafeTensors::deserialize(bytes);
    if let Ok(file) = &mine {
        for e in &file.entries {
            let raw = file.bytes(&e.name).expect("listed tensors exist");
            assert_eq!(raw.len(), e.data_offsets.1 - e.data_offsets.0);
            if let Ok(t) = file.tensor(&e.name) {
                let count: usize = t.shape.iter().product();
                assert_eq!(count, t.data.len(), "{}: elements fill the shape", e.name);
            }
        }
    }
    match (&mine, &reference) {
        (Ok(file), Ok(reference)) => {
            assert_eq!(file.entries.len(), reference.len());
            for e in &file.entries {
                let r = reference.tensor(&e.name).expect("same names");
                assert_eq!(r.shape(), e.shape.as_slice(), "{}: shape", e.name);
                assert_eq!(format!("{:?}", r.dtype()), e.dtype, "{}: dtype", e.name);
                assert!(
                    r.data() == file.bytes(&e.name).expect("listed"),
                    "{}: bytes",
                    e.name
                );
            }
        }
        (Err(_), Err(_)) => {}
        (Ok(_), Err(e)) => panic!("accepted a file the reference rejects: {e}"),
        (Err(e), Ok(_)) => panic!("rejected a file the reference accepts: {e}"),
    }
});
