//! Getting a signed bundle to the gates.
//!
//! Envoy: an ECDS resource (crate::ecds) written atomically — temp file in the same
//! directory, fsync, rename — so Envoy's file watch only ever sees whole files. For the
//! dynamic module the bundle file it names is written first, the same way.
//!
//! Worker: `crate::worker_push`.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use tokengate_core::{Expectation, Gate, Target};

use crate::ecds::{self, Filter};
use crate::keys::Keyring;
use crate::store::{self, Actor, Store};
use crate::Issued;

/// Writes `bytes` to `path` atomically. `path` must be new or a regular file: a rename
/// would replace a device, a directory entry of another kind, or a symlink itself.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_file() {
            anyhow::bail!(
                "{} exists and is not a regular file; refusing to replace it (give a new path or a regular file)",
                path.display()
            );
        }
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?
        .to_string_lossy();
    let temp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut file =
            std::fs::File::create(&temp).with_context(|| format!("creating {}", temp.display()))?;
        // Readable by an Envoy running as another user whatever the umask; nothing written
        // here is secret (bundles hold hashes and public keys).
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
            .with_context(|| format!("renaming onto {}", path.display()))?;
        // The rename itself is durable only once the directory is: a bundle file must be on
        // disk before the ECDS file that names it.
        std::fs::File::open(dir).and_then(|d| d.sync_all())?;
        Ok(())
    })();
    if result.is_err() {
        std::fs::remove_file(&temp).ok();
    }
    result
}

/// A bundle made earlier (`tokengate bundle --out`), checked exactly as the gate will; its
/// bytes are written or sent as read.
pub fn prebuilt(store: &Store, path: &Path, target: Target) -> Result<Issued> {
    let trusted = crate::published_key_set(store)?;
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let environment = store.environment()?;
    let expect = Expectation {
        target,
        environment: Some(&environment),
        newer_than: store.pushed_version(&target.to_string())?,
    };
    let gate = Gate::load(&text, &trusted, &expect).map_err(|e| {
        anyhow::anyhow!("{}: the gate would refuse this bundle: {e}", path.display())
    })?;
    let text = String::from_utf8(text)
        .map_err(|_| anyhow::anyhow!("{}: a bundle is UTF-8 text", path.display()))?;
    Ok(Issued {
        version: gate.version(),
        tokens: gate.token_count(),
        keys: gate.keys().clone(),
        text,
    })
}

/// The filter to name in the resource: `--module` or `--wasm` if given, else the one the
/// ECDS file names already (a push keeps the filter Envoy runs; an absolute path only, as
/// a relative one is Envoy's working directory's, which the CLI does not know), else the
/// module built beside this binary (`target/native/` from `target/debug/` or
/// `target/release/`).
fn choose_filter(
    module: Option<&Path>,
    wasm: Option<&Path>,
    file: &Path,
    existing: Option<&Filter>,
) -> Result<Filter> {
    let beside_binary = || -> Option<PathBuf> {
        let exe = std::env::current_exe().ok()?;
        let built = exe.parent()?.parent()?.join("native/libtokengate.so");
        built.exists().then_some(built)
    };
    let filter = match (module, wasm) {
        (Some(_), Some(_)) => anyhow::bail!("--module and --wasm name two filters; give one"),
        (Some(module), None) => Filter::Module(module.into()),
        (None, Some(wasm)) => Filter::Wasm(wasm.into()),
        (None, None) => match existing {
            Some(filter) if !filter.path().is_absolute() => anyhow::bail!(
                "{} names the filter by a relative path ({}), relative to Envoy's working directory: pass --module PATH (or --wasm PATH)",
                file.display(),
                filter.path().display()
            ),
            Some(filter) => filter.clone(),
            None => Filter::Module(beside_binary().context(
                "which filter should Envoy run? pass --module PATH (the libtokengate.so built with `cargo build -p tokengate-dynamic-module --profile native`) or --wasm PATH",
            )?),
        },
    };
    filter.canonical()
}

/// Writes the module's bundle file (content-addressed, written once) and returns its path
/// and the module's configuration naming it.
fn write_bundle_file(
    file: &Path,
    issued: &Issued,
    trusted_keys: &str,
) -> Result<(PathBuf, String)> {
    let sha256 = tokengate_core::hex::encode(&Sha256::digest(issued.text.as_bytes()));
    let directory = ecds::bundle_directory(file)?;
    std::fs::create_dir_all(&directory)
        .with_context(|| format!("creating {}", directory.display()))?;
    let directory = std::fs::canonicalize(&directory)?;
    let path = directory.join(ecds::bundle_name(issued.version, &sha256));
    write_atomically(&path, issued.text.as_bytes())?;
    let reference = ecds::module_reference(&path, &sha256, trusted_keys)?;
    Ok((path, reference))
}

/// Removes this ECDS file's bundle files but `keep` (the one written now and the one the
/// previous ECDS file named, which a restore may need again). Only names the CLI writes are
/// touched, and only in this ECDS file's own directory.
fn prune_bundle_files(file: &Path, keep: &[Option<PathBuf>]) {
    let Ok(directory) = ecds::bundle_directory(file) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(directory) else {
        return;
    };
    let kept: Vec<PathBuf> = keep
        .iter()
        .flatten()
        .filter_map(|k| std::fs::canonicalize(k).ok())
        .collect();
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(ecds::is_bundle_name);
        let keep = std::fs::canonicalize(&path).is_ok_and(|p| kept.contains(&p));
        if ours && !keep {
            std::fs::remove_file(&path).ok();
        }
    }
}

/// Signs a new bundle for Envoy (or takes a prebuilt one), checks it as the filter will,
/// writes it (the module: a bundle file and a reference to it; the wasm filter: inline) into
/// the ECDS file with the published keys and, given Envoy's admin endpoint, waits until
/// Envoy serves it (restoring the previous file if Envoy refuses it); records the push;
/// returns the version.
#[allow(clippy::too_many_arguments)]
pub fn envoy(
    store: &mut Store,
    ring: &Keyring,
    file: &Path,
    code: (Option<&Path>, Option<&Path>),
    admin: Option<&str>,
    prebuilt_bundle: Option<&Path>,
    now: u64,
    who: &Actor,
) -> Result<u64> {
    // Before anything is signed: a name Envoy would read in another encoding, an unusable
    // admin URL or a missing filter changes nothing.
    let encoding = ecds::Encoding::of(file)?;
    let admin = admin
        .map(|url| crate::status::base_url(url, "--admin"))
        .transpose()?;
    // What the ECDS file names now: the filter a push keeps, the bundle file it keeps.
    let (existing_filter, previous_bundle) = ecds::existing(file).unzip();
    let filter = choose_filter(code.0, code.1, file, existing_filter.as_ref())?;
    let before = admin.as_deref().map(crate::status::envoy).transpose()?;
    let issued = match prebuilt_bundle {
        Some(path) => prebuilt(store, path, Target::Envoy)?,
        None => crate::issue_bundle(store, ring, Target::Envoy, now, who)?,
    };
    let trusted_keys = issued.keys.to_text();
    let (bundle_file, configuration) = match &filter {
        Filter::Module(_) => {
            let (path, reference) = write_bundle_file(file, &issued, &trusted_keys)?;
            (Some(path), reference)
        }
        Filter::Wasm(_) => (None, issued.text.clone()),
    };
    let resource = ecds::Resource {
        filter: &filter,
        version: issued.version,
        configuration: &configuration,
        trusted_keys: &trusted_keys,
    }
    .encode(encoding)?;
    let previous = std::fs::read(file).ok();
    write_atomically(file, &resource)?;
    if let (Some(admin), Some(before)) = (&admin, &before) {
        if let Err(refused) = crate::status::confirm_envoy(admin, issued.version, before) {
            // A restart must not load what Envoy refused now: the file goes back.
            if let Some(previous) = &previous {
                write_atomically(file, previous)?;
            }
            return Err(refused);
        }
    }
    prune_bundle_files(file, &[bundle_file.clone(), previous_bundle.flatten()]);
    let destination = file.display().to_string();
    let details = serde_json::json!({"version": issued.version, "file": destination, "bundle_file": bundle_file, "tokens": issued.tokens, "keys": issued.keys.ids(), "confirmed": admin.is_some()});
    store.transaction(who, "push.envoy", None, details, now, |tx| {
        store::record_push(tx, "envoy", issued.version, now, &destination)
    })?;
    Ok(issued.version)
}
