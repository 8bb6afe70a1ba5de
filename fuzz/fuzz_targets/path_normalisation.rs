//! Any text as a request path: normalising never panics, and what it returns is a fixed point
//! (normalising it again changes nothing), absolute, free of `;`, `\`, NUL, `//`, `.` and `..`
//! segments: the path a rule matches is the path the upstream receives.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate_core::policy::normalize_path;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(path) = normalize_path(raw) else {
        return;
    };
    assert!(path.starts_with('/'), "{path:?}");
    assert!(!path.contains(';') && !path.contains('\\') && !path.contains('\0'), "{path:?}");
    assert!(!path.contains("//"), "{path:?}");
    let mut segments = path.split('/').skip(1);
    assert!(segments.all(|s| s != "." && s != ".."), "{path:?}");
    let again = normalize_path(&path).map(|p| p.into_owned());
    assert_eq!(again.as_deref(), Ok(&*path), "not a fixed point");
});
