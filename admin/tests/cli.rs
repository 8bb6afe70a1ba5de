//! The real `tokengate` binary against its real store: what an operator would check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failure is the report

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

struct Env {
    dir: PathBuf,
}

impl Env {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tokengate-cli-{name}-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).unwrap();
        let env = Self { dir };
        env.ok(&["init", "--environment", "test"]);
        env
    }

    fn store(&self) -> PathBuf {
        self.dir.join("tokengate.db")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tokengate"));
        command
            .args(args)
            .env_remove("TOKENGATE_SIGNING_KEY")
            .env("TOKENGATE_STORE", self.store())
            .env("TOKENGATE_ACTOR", "tester");
        command
    }

    fn run(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args, "");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn fails(&self, args: &[&str], stdin: &str) -> String {
        let out = self.run(args, stdin);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?} should fail: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    fn audit_len(&self) -> usize {
        let json: serde_json::Value =
            serde_json::from_str(&self.ok(&["audit", "--json", "--limit", "1000"])).unwrap();
        json.as_array().unwrap().len()
    }

    fn check(&self, token: &str, path: &str) -> serde_json::Value {
        let out = self.run(&["check", "--path", path, "--json"], token);
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

fn files_contain(dir: &Path, needle: &str) -> bool {
    std::fs::read_dir(dir).unwrap().any(|entry| {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap_or_default();
        bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
    })
}

#[test]
fn create_prints_the_token_alone_once_and_stores_only_its_hash() {
    let env = Env::new("create");
    let out = env.run(&["create", "ci-deploy", "--scopes", "orders:read"], "");
    let token = String::from_utf8(out.stdout).unwrap();
    let token = token.strip_suffix('\n').unwrap();
    assert!(
        token.starts_with("sk_live_") && token.len() == 57,
        "stdout must be the token alone: {token:?}"
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains(token));
    assert!(
        !files_contain(&env.dir, token),
        "the plaintext reached the disk"
    );
    for listing in [
        env.ok(&["list"]),
        env.ok(&["list", "--json"]),
        env.ok(&["show", "ci-deploy", "--json"]),
        env.ok(&["audit", "--json"]),
    ] {
        assert!(!listing.contains(token));
    }
    assert_eq!(env.check(token, "/api/x")["status"], 200);
    assert_eq!(env.check(token, "/api/x")["subject"], "ci-deploy");
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let env = Env::new("bad");
    env.ok(&["create", "taken", "--scopes", "a:b"]);
    let before = env.audit_len();
    let cases: &[(&[&str], &str)] = &[
        (&["create", "taken", "--scopes", "a:b"], "already exists"),
        (&["create", "Bad Name"], "must match"),
        (&["create", "x", "--scopes", "Orders Read"], "scope"),
        (&["create", "x", "--prefix", "SK"], "prefix"),
        (&["create", "x", "--expires-in", "5y"], "unit"),
        (
            &["create", "x", "--expires-at", "2001-01-01T00:00:00Z"],
            "not in the future",
        ),
        (&["revoke", "nobody", "--reason", "r"], "no token named"),
        (&["rotate", "nobody", "--grace", "1h"], "no token named"),
        (&["revoke-all", "--reason", "r"], "--yes"),
        (&["init", "--environment", "test"], "already exists"),
        // Past the store's range: an error, never a silent "no expiry" or "valid at once".
        (
            &["create", "x", "--expires-at", "10000000000000000000"],
            "after 9999",
        ),
        (
            &["create", "x", "--not-before", "10000000000000000000"],
            "after 9999",
        ),
        (
            &["create", "x", "--expires-at", "99999999999999999999"],
            "out of range",
        ),
        (
            &["create", "x", "--expires-in", "99999999999999999d"],
            "too long",
        ),
        (
            &["create", "x", "--expires-in", "2562047788015w"],
            "past 9999",
        ),
        (
            &["rotate", "taken", "--grace", "9999999999999d"],
            "past 9999",
        ),
        (
            &["create", "x", "--expires-at", "2027-02-30T00:00:60Z"],
            "UTC time",
        ),
    ];
    for (args, needle) in cases {
        let error = env.fails(args, "");
        assert!(error.contains(needle), "{args:?}: {error}");
    }
    let error = env.fails(&["import", "legacy"], "short");
    assert!(error.contains("16"), "{error}");
    assert_eq!(
        env.audit_len(),
        before,
        "a refused command wrote an audit event"
    );
    let listed: serde_json::Value = serde_json::from_str(&env.ok(&["list", "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
}

#[test]
fn import_reads_the_secret_from_stdin_or_env_never_argv() {
    let env = Env::new("import");
    let secret = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let out = env.run(
        &["import", "legacy", "--scopes", "orders:read"],
        &format!("{secret}\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "import must not echo the secret");
    assert_eq!(env.check(secret, "/api/orders")["status"], 200);
    let out = env
        .command(&["import", "legacy2", "--from-env", "LEGACY_SECRET"])
        .env("LEGACY_SECRET", format!("{secret}-2"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!files_contain(&env.dir, secret));
    // The same secret twice is refused.
    env.fails(&["import", "again"], secret);
}

#[test]
fn rotate_revoke_and_revoke_all_as_the_gate_sees_them() {
    let env = Env::new("lifecycle");
    let old = env
        .ok(&["create", "svc", "--scopes", "*"])
        .trim()
        .to_owned();
    let new = env
        .ok(&["rotate", "svc", "--grace", "1h", "--reason", "quarterly"])
        .trim()
        .to_owned();
    assert_ne!(old, new);
    assert_eq!(
        env.check(&old, "/x")["status"],
        200,
        "old token passes during grace"
    );
    assert_eq!(env.check(&new, "/x")["status"], 200);
    assert_eq!(
        env.check(&old, "/x")["subject"],
        "svc",
        "same subject during grace"
    );
    let ended = env
        .ok(&["rotate", "svc", "--grace", "0s"])
        .trim()
        .to_owned();
    assert_eq!(
        env.check(&new, "/x")["reason"],
        "unknown",
        "a zero grace ends the old secret now"
    );
    assert_eq!(env.check(&ended, "/x")["status"], 200);

    env.ok(&["revoke", "svc", "--reason", "leaked"]);
    assert_eq!(env.check(&ended, "/x")["reason"], "revoked");

    let other = env.ok(&["create", "other"]).trim().to_owned();
    env.ok(&["revoke-all", "--reason", "incident", "--yes"]);
    assert_eq!(env.check(&other, "/x")["status"], 401);
    let after = env.ok(&["create", "after"]).trim().to_owned();
    assert_eq!(
        env.check(&after, "/x")["status"],
        200,
        "tokens issued after revoke-all work"
    );

    let audit: serde_json::Value = serde_json::from_str(&env.ok(&["audit", "--json"])).unwrap();
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for action in [
        "token.create",
        "token.rotate",
        "token.revoke",
        "token.revoke_all",
    ] {
        assert!(
            actions.contains(&action),
            "{action} missing from {actions:?}"
        );
    }
    let revoke = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "token.revoke")
        .unwrap();
    assert_eq!(revoke["actor"], "tester");
    assert_eq!(revoke["reason"], "leaked");
}

#[test]
fn expiring_exits_non_zero_when_something_expires_within_the_window() {
    let env = Env::new("expiring");
    env.ok(&["create", "long", "--expires-in", "90d"]);
    assert_eq!(
        env.run(&["expiring", "--within", "7d"], "").status.code(),
        Some(0)
    );
    env.ok(&["create", "short", "--expires-in", "2d"]);
    let out = env.run(&["expiring", "--within", "7d", "--json"], "");
    assert_eq!(out.status.code(), Some(1));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["name"], "short");
}

#[test]
fn policy_errors_point_at_the_line_and_change_nothing() {
    let env = Env::new("policy");
    let file = env.dir.join("policy.toml");
    let example = env.ok(&["policy", "example"]);
    std::fs::write(
        &file,
        example.replace("methods = [\"GET\", \"HEAD\"]", "methods = [\"get\"]"),
    )
    .unwrap();
    let before = env.ok(&["policy", "show"]);
    let error = env.fails(&["policy", "set", file.to_str().unwrap()], "");
    assert!(
        error.contains("policy.toml:7:") && error.contains("method"),
        "{error}"
    );
    assert_eq!(env.ok(&["policy", "show"]), before);
    std::fs::write(
        &file,
        example.replace("access = \"token\"", "access = \"tokne\""),
    )
    .unwrap();
    let error = env.fails(&["policy", "set", file.to_str().unwrap()], "");
    assert!(error.contains("policy.toml:15"), "{error}");
}

#[test]
fn concurrent_commands_never_corrupt_the_store() {
    let env = Env::new("concurrent");
    let children: Vec<_> = (0..8)
        .map(|i| {
            env.command(&["create", &format!("svc-{i}"), "--scopes", "a:b"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let tokens: Vec<String> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success());
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        })
        .collect();
    let listed: serde_json::Value = serde_json::from_str(&env.ok(&["list", "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 8);
    for token in &tokens {
        assert_eq!(env.check(token, "/x")["status"], 200);
    }
}

/// `push envoy --file <dir>/<file>` with a stand-in filter; the file's bytes.
fn push_envoy(env: &Env, file: &str) -> Vec<u8> {
    push_envoy_with(env, file, &[])
}

/// `push envoy` as [`push_envoy`], with `extra` arguments (e.g. `--bundle F`).
fn push_envoy_with(env: &Env, file: &str, extra: &[&str]) -> Vec<u8> {
    let wasm = env.dir.join("filter.wasm");
    std::fs::write(&wasm, b"\0asm").unwrap();
    let path = env.dir.join(file);
    let mut args = vec![
        "push",
        "envoy",
        "--file",
        path.to_str().unwrap(),
        "--wasm",
        wasm.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    env.ok(&args);
    std::fs::read(path).unwrap()
}

#[test]
fn push_envoy_writes_a_bundle_the_filter_accepts_and_never_the_key() {
    let env = Env::new("push");
    let token = env.ok(&["create", "svc"]).trim().to_owned();
    let wasm = env.dir.join("filter.wasm");
    let ecds = env.dir.join("ecds.json");
    let first: serde_json::Value = serde_json::from_slice(&push_envoy(&env, "ecds.json")).unwrap();
    let second: serde_json::Value = serde_json::from_slice(&push_envoy(&env, "ecds.json")).unwrap();
    let version =
        |v: &serde_json::Value| v["version_info"].as_str().unwrap().parse::<u64>().unwrap();
    assert!(
        version(&second) > version(&first),
        "each push is a newer version"
    );
    let key = std::fs::read_to_string(env.dir.join("tokengate.key")).unwrap();
    let text = std::fs::read_to_string(&ecds).unwrap();
    assert!(!text.contains(key.trim()) && !text.contains(&token));
    // Without the key, nothing is pushed.
    std::fs::remove_file(env.dir.join("tokengate.key")).unwrap();
    let error = env.fails(
        &[
            "push",
            "envoy",
            "--file",
            ecds.to_str().unwrap(),
            "--wasm",
            wasm.to_str().unwrap(),
        ],
        "",
    );
    assert!(error.contains("signing key"), "{error}");
    assert_eq!(std::fs::read_to_string(&ecds).unwrap(), text);
}

#[test]
fn push_envoy_to_a_pb_file_writes_binary_protobuf_never_the_key() {
    let env = Env::new("push-pb");
    let token = env.ok(&["create", "svc"]).trim().to_owned();
    // A name Envoy would read as protobuf text: refused before anything is signed or written.
    let text = env.dir.join("ecds.pb_text");
    let error = env.fails(&["push", "envoy", "--file", text.to_str().unwrap()], "");
    assert!(error.contains(".pb_text"), "{error}");
    assert!(!text.exists());
    let binary = push_envoy(&env, "ecds.pb");
    assert!(serde_json::from_slice::<serde_json::Value>(&binary).is_err());
    // The bundle travels inside as it is signed, byte for byte (StringValue.value).
    let head = br#"{"format":"tokengate.bundle/v2","signatures":[{"key_id":"kid_"#;
    assert!(binary.windows(head.len()).any(|w| w == head));
    let key = std::fs::read_to_string(env.dir.join("tokengate.key")).unwrap();
    for secret in [key.trim(), token.as_str()] {
        assert!(!binary.windows(secret.len()).any(|w| w == secret.as_bytes()));
    }
}

#[test]
fn push_envoy_of_a_prebuilt_bundle_writes_it_byte_for_byte_with_the_published_keys() {
    use tokengate_core::{Expectation, Gate, KeySet, Target};
    let env = Env::new("push-prebuilt");
    env.ok(&["create", "svc"]);
    let prebuilt = env.dir.join("prebuilt.json");
    env.ok(&[
        "bundle",
        "--target",
        "envoy",
        "--out",
        prebuilt.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&prebuilt).unwrap();
    let ecds = push_envoy_with(&env, "ecds.json", &["--bundle", prebuilt.to_str().unwrap()]);
    let resource: serde_json::Value = serde_json::from_slice(&ecds).unwrap();
    let config = &resource["resources"][0]["typed_config"]["config"];
    let written = config["configuration"]["value"].as_str().unwrap();
    assert_eq!(written, text, "the bundle goes to Envoy as it was signed");
    let keys = config["vm_config"]["environment_variables"]["key_values"]["TOKENGATE_TRUSTED_KEYS"]
        .as_str()
        .unwrap();
    assert_eq!(keys, env.ok(&["key", "public"]).trim());
    let expect = Expectation {
        target: Target::Envoy,
        environment: Some("test"),
        newer_than: None,
    };
    let trusted = KeySet::parse(keys).unwrap();
    assert_eq!(
        Gate::load(written.as_bytes(), &trusted, &expect)
            .unwrap()
            .token_count(),
        1
    );
    // The same bundle reformatted no longer matches its signatures: refused, nothing written.
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    std::fs::write(&prebuilt, serde_json::to_string_pretty(&value).unwrap()).unwrap();
    let ecds_path = env.dir.join("ecds.json");
    let error = env.fails(
        &[
            "push",
            "envoy",
            "--file",
            ecds_path.to_str().unwrap(),
            "--wasm",
            env.dir.join("filter.wasm").to_str().unwrap(),
            "--bundle",
            prebuilt.to_str().unwrap(),
        ],
        "",
    );
    assert!(error.contains("signature"), "{error}");
    assert_eq!(std::fs::read(&ecds_path).unwrap(), ecds);
}

/// The signatures of a published bundle, by key id.
fn signers(text: &str) -> Vec<String> {
    let value: serde_json::Value = serde_json::from_str(text).unwrap();
    value["signatures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["key_id"].as_str().unwrap().to_owned())
        .collect()
}

fn key_ids(env: &Env) -> Vec<(String, String)> {
    let list: serde_json::Value =
        serde_json::from_str(&env.ok(&["key", "list", "--json"])).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["key_id"].as_str().unwrap().to_owned(),
                k["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn key_rotate_publishes_both_keys_and_retire_leaves_the_new_one_alone() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new("keys");
    let key_file = env.dir.join("tokengate.key");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key_file), 0o600);
    let old = key_ids(&env);
    assert_eq!(old.len(), 1);
    let old_id = old[0].0.clone();
    let bundle = |env: &Env| env.ok(&["bundle", "--target", "envoy"]);
    assert_eq!(signers(&bundle(&env)), vec![old_id.clone()]);

    env.ok(&["key", "rotate", "--reason", "yearly"]);
    let keys = key_ids(&env);
    assert_eq!(keys.len(), 2);
    let new_id = keys[1].0.clone();
    assert_eq!(
        mode(&key_file),
        0o600,
        "the rewritten key file stays private"
    );
    assert_eq!(
        std::fs::read_to_string(&key_file).unwrap().lines().count(),
        2
    );
    assert_eq!(signers(&bundle(&env)), vec![old_id.clone(), new_id.clone()]);
    assert_eq!(env.ok(&["key", "public"]).trim().split(',').count(), 2);

    // The last active key cannot be retired; an unknown id changes nothing.
    let before = env.audit_len();
    let error = env.fails(&["key", "retire", "kid_0000000000000000"], "");
    assert!(error.contains("no key"), "{error}");
    assert_eq!(env.audit_len(), before);

    env.ok(&["key", "retire", &old_id, "--reason", "rotated"]);
    assert_eq!(
        key_ids(&env),
        vec![
            (old_id.clone(), "retired".into()),
            (new_id.clone(), "active".into())
        ]
    );
    assert_eq!(signers(&bundle(&env)), vec![new_id.clone()]);
    assert_eq!(
        std::fs::read_to_string(&key_file).unwrap().lines().count(),
        1
    );
    let error = env.fails(&["key", "retire", &new_id], "");
    assert!(error.contains("only active key"), "{error}");
    let audit = env.ok(&["audit", "--json"]);
    assert!(audit.contains("key.rotate") && audit.contains("key.retire"));
    // Nothing printed, logged or stored holds a private key.
    let private = std::fs::read_to_string(&key_file).unwrap();
    assert!(only_the_key_file_holds(&env.dir, private.trim()));
}

/// Whether the key file is the only file under `dir` holding `needle`.
fn only_the_key_file_holds(dir: &Path, needle: &str) -> bool {
    std::fs::read_dir(dir).unwrap().flatten().all(|entry| {
        let path = entry.path();
        path.file_name().is_some_and(|n| n == "tokengate.key")
            || !std::fs::read(&path)
                .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
    })
}

#[test]
fn keys_come_from_a_command_or_the_environment_never_argv_and_a_shared_key_file_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new("key-sources");
    let key_file = env.dir.join("tokengate.key");
    let private = std::fs::read_to_string(&key_file).unwrap();
    // A key file others can read is refused: it can sign anything.
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let error = env.fails(&["bundle", "--target", "envoy"], "");
    assert!(error.contains("chmod 600"), "{error}");
    assert!(!error.contains(private.trim()));
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // --key-command: its stdout is the key (a secret manager's CLI).
    let command = format!("cat {}", key_file.display());
    let out = env.ok(&["bundle", "--target", "envoy", "--key-command", &command]);
    assert_eq!(signers(&out).len(), 1);
    let error = env.fails(
        &["bundle", "--target", "envoy", "--key-command", "exit 3"],
        "",
    );
    assert!(error.contains("key command failed"), "{error}");
    // TOKENGATE_SIGNING_KEY; a malformed one is named, never echoed.
    let ok = env
        .command(&["bundle", "--target", "envoy"])
        .env("TOKENGATE_SIGNING_KEY", private.trim())
        .output()
        .unwrap();
    assert!(ok.status.success());
    let bad = env
        .command(&["bundle", "--target", "envoy"])
        .env("TOKENGATE_SIGNING_KEY", "abc123-not-a-key")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr.contains("TOKENGATE_SIGNING_KEY") && !stderr.contains("abc123"),
        "{stderr}"
    );
    // A key the store does not publish signs nothing.
    let stranger = "11".repeat(32);
    let out = env
        .command(&["bundle", "--target", "envoy"])
        .env("TOKENGATE_SIGNING_KEY", &stranger)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("published"));
}

#[test]
fn outputs_replace_only_regular_files_and_the_store_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new("files");
    env.ok(&["create", "svc"]);
    // What a rename would replace: a directory, a socket (a device as root), a symlink.
    let dir = env.dir.join("a-directory");
    std::fs::create_dir(&dir).unwrap();
    let socket = env.dir.join("a-socket");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let target = env.dir.join("real.json");
    std::fs::write(&target, "keep").unwrap();
    let link = env.dir.join("a-link.json");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    for path in [&dir, &socket, &link] {
        let error = env.fails(
            &[
                "bundle",
                "--target",
                "envoy",
                "--out",
                path.to_str().unwrap(),
            ],
            "",
        );
        assert!(
            error.contains("not a regular file"),
            "{}: {error}",
            path.display()
        );
        let error = push_envoy_fails(&env, path);
        assert!(
            error.contains("not a regular file"),
            "{}: {error}",
            path.display()
        );
    }
    assert!(dir.is_dir() && std::fs::read_to_string(&target).unwrap() == "keep");
    assert!(std::fs::symlink_metadata(&socket)
        .unwrap()
        .file_type()
        .is_socket());
    // A regular file is replaced.
    let out = env.dir.join("bundle.json");
    std::fs::write(&out, "old").unwrap();
    env.ok(&[
        "bundle",
        "--target",
        "envoy",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(std::fs::read_to_string(&out)
        .unwrap()
        .starts_with("{\"format\""));
    // The store, its WAL and shared memory, the lock and the key: the owner's alone.
    let mut checked = 0;
    for entry in std::fs::read_dir(&env.dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("tokengate.") {
            let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name} is {mode:o}");
            checked += 1;
        }
    }
    assert!(checked >= 3, "store, lock and key at least");
}

use std::os::unix::fs::FileTypeExt;

/// `push envoy --file PATH` with a stand-in filter, expected to fail; its stderr.
fn push_envoy_fails(env: &Env, path: &Path) -> String {
    let wasm = env.dir.join("filter.wasm");
    std::fs::write(&wasm, b"\0asm").unwrap();
    env.fails(
        &[
            "push",
            "envoy",
            "--file",
            path.to_str().unwrap(),
            "--wasm",
            wasm.to_str().unwrap(),
        ],
        "",
    )
}

#[test]
fn push_envoy_keeps_the_filter_the_ecds_file_names_and_init_adopts_a_key_file() {
    let env = Env::new("wasm-default");
    let first = push_envoy(&env, "ecds.json");
    let named = |bytes: &[u8]| {
        let v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        v["resources"][0]["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // From another directory and without --wasm: the filter the file already names.
    let ecds = env.dir.join("ecds.json");
    let out = env
        .command(&["push", "envoy", "--file", ecds.to_str().unwrap()])
        .current_dir("/")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(named(&std::fs::read(&ecds).unwrap()), named(&first));
    // A new store adopts an existing key file instead of refusing it.
    let other = env.dir.join("other.db");
    let key = env.dir.join("tokengate.key");
    let out = env
        .command(&[
            "init",
            "--environment",
            "test",
            "--key-file",
            key.to_str().unwrap(),
        ])
        .env("TOKENGATE_STORE", &other)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = |store: &Path| {
        let out = env
            .command(&["key", "public"])
            .env("TOKENGATE_STORE", store)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(public(&other), public(&env.store()));
}

#[test]
fn push_envoy_with_the_module_writes_a_bundle_file_per_ecds_file_and_prunes_only_its_own() {
    let env = Env::new("module-files");
    env.ok(&["create", "svc"]);
    let module = env.dir.join("libtokengate.so");
    std::fs::write(&module, b"\x7fELF").unwrap();
    let push = |file: &str| -> serde_json::Value {
        let path = env.dir.join(file);
        env.ok(&[
            "push",
            "envoy",
            "--file",
            path.to_str().unwrap(),
            "--module",
            module.to_str().unwrap(),
        ]);
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let reference = |resource: &serde_json::Value| -> serde_json::Value {
        let text = resource["resources"][0]["typed_config"]["filter_config"]["value"]
            .as_str()
            .unwrap();
        serde_json::from_str(text).unwrap()
    };
    let files = |ecds: &str| -> Vec<String> {
        let dir = env.dir.join("tokengate-bundles").join(ecds);
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    // Another gateway's ECDS file in the same directory, and a file the CLI never wrote.
    let other = reference(&push("b.json"));
    let stranger = env.dir.join("tokengate-bundles/a.json/vendor.json");
    std::fs::create_dir_all(stranger.parent().unwrap()).unwrap();
    std::fs::write(&stranger, b"{}").unwrap();
    let mut named = Vec::new();
    for _ in 0..3 {
        let reference = reference(&push("a.json"));
        // The reference names a file whose bytes have its SHA-256, readable by Envoy.
        let path = std::path::PathBuf::from(reference["bundle"].as_str().unwrap());
        let bytes = std::fs::read(&path).unwrap();
        use sha2::Digest;
        let digest = tokengate_core::hex::encode(&sha2::Sha256::digest(&bytes));
        assert_eq!(reference["sha256"], digest.as_str());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        named.push(path.file_name().unwrap().to_str().unwrap().to_owned());
    }
    // a.json keeps the file it names and the one before; b.json's is untouched; so is a
    // file of another name.
    let mut kept = vec![named[1].clone(), named[2].clone(), "vendor.json".to_owned()];
    kept.sort();
    assert_eq!(files("a.json"), kept);
    assert!(std::path::Path::new(other["bundle"].as_str().unwrap()).exists());
    assert_eq!(files("b.json").len(), 1);
}

/// An HTTP answer: status, extra headers, body.
type Answer = (u16, Vec<(&'static str, String)>, String);

/// A gate on 127.0.0.1 that answers each request with the next of `answers` and then stops;
/// its base URL.
fn fake_gate(answers: Vec<Answer>) -> String {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for (status, headers, body) in answers {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            let timeout = Some(std::time::Duration::from_secs(10));
            stream.set_read_timeout(timeout).unwrap();
            // The request head (a GET has no body), read up to its blank line.
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                request.push(byte[0]);
            }
            let mut head = format!(
                "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n",
                body.len()
            );
            for (name, value) in headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            stream
                .write_all(format!("{head}\r\n{body}").as_bytes())
                .ok();
        }
    });
    url
}

fn report(environment: &str, lines: &[(&str, u64, u64)]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let tokens: Vec<serde_json::Value> = lines
        .iter()
        .map(|(id, allowed, last_seen)| {
            serde_json::json!({"token_id": id, "allowed": allowed, "denied_scope": 0, "last_seen": last_seen})
        })
        .collect();
    serde_json::json!({"format": "tokengate.usage/v1", "instance": "envoy-fake", "environment": environment,
        "taken_at": now, "tokens": tokens})
    .to_string()
}

/// `usage pull` merges what a gate reports once, whatever it answers again; a report it
/// cannot trust (another environment, a redirect, a regressed count) changes nothing; and
/// `unused` refuses to answer from figures older than its window.
#[test]
fn usage_pull_counts_each_use_once_and_refuses_what_it_cannot_trust() {
    let env = Env::new("usage");
    let refused = env.fails(&["unused", "--for", "1d"], "");
    assert!(refused.contains("usage pull"), "{refused}");
    env.ok(&["create", "used"]);
    env.ok(&["create", "idle"]);
    let listed: serde_json::Value = serde_json::from_str(&env.ok(&["list", "--json"])).unwrap();
    let id = |name: &str| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap()["token_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let used = id("used");
    let seen = 1_800_000_000;
    let uses = |env: &Env| {
        let listed: serde_json::Value = serde_json::from_str(&env.ok(&["list", "--json"])).unwrap();
        let row = |name: &str| {
            let t = listed
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["name"] == name)
                .unwrap();
            (
                t["uses"].as_u64().unwrap(),
                t["last_used"].as_str().map(str::to_owned),
            )
        };
        (row("used"), row("idle"))
    };
    let ok = (
        200,
        Vec::new(),
        report(
            "test",
            &[
                (&used, 5, seen),
                ("tid_00000000deadbeef", 3, seen),
                ("sub:deploy-job", 7, seen + 1),
            ],
        ),
    );
    let regressed = (200, Vec::new(), report("test", &[(&used, 3, seen + 5)]));
    let gate = fake_gate(vec![ok.clone(), ok, regressed]);
    for _ in 0..3 {
        env.ok(&["usage", "pull", "--envoy-url", &gate]);
    }
    let ((count, last), (idle, idle_last)) = uses(&env);
    assert_eq!((count, idle, idle_last), (5, 0, None));
    assert_eq!(last.as_deref(), Some("2027-01-15T08:00:00Z"));
    // Signed tokens are counted by the subject they were minted for, once too.
    let subjects: serde_json::Value =
        serde_json::from_str(&env.ok(&["usage", "subjects", "--json"])).unwrap();
    assert_eq!(
        subjects,
        serde_json::json!([{"subject": "deploy-job", "last_used": seen + 1, "uses": 7,
                            "uses_30d": 7, "denied_scope": 0}])
    );
    let audit = env.audit_len();
    let elsewhere = fake_gate(vec![(200, Vec::new(), report("prod", &[(&used, 9, seen)]))]);
    let refused = env.fails(&["usage", "pull", "--envoy-url", &elsewhere], "");
    assert!(refused.contains("environment"), "{refused}");
    let moved = (
        302,
        vec![("location", format!("{elsewhere}/x"))],
        String::new(),
    );
    let redirect = fake_gate(vec![moved]);
    let refused = env.fails(&["usage", "pull", "--worker-url", &redirect], "");
    assert!(
        refused.contains("302"),
        "a redirect is not followed: {refused}"
    );
    assert_eq!(uses(&env).0 .0, 5);
    assert_eq!(env.audit_len(), audit, "a refused pull records nothing");
    assert_eq!(
        env.run(&["unused", "--for", "1d"], "").status.code(),
        Some(0)
    );
}

#[test]
fn rate_limits_are_set_per_rule_and_per_token_and_checked_before_they_reach_a_gate() {
    let env = Env::new("rate");
    let file = env.dir.join("policy.toml");
    let limited = env.ok(&["policy", "example"]).replace(
        "access = \"token\"",
        "access = \"token\"\nrate_limit = { requests = 600, per = \"minute\" }",
    );
    std::fs::write(&file, &limited).unwrap();
    env.ok(&["policy", "set", file.to_str().unwrap()]);
    let roomy = env.ok(&["create", "roomy", "--rate", "100/s"]);
    let tight = env.ok(&["create", "tight", "--rate", "5/min"]);
    // Both apply, the stricter first: the rule's 10/s before the token's own 100/s, the
    // token's own 5/min before the rule's.
    let rule = env.check(roomy.trim(), "/api/x");
    assert_eq!(rule["status"], 200, "{rule}");
    let limits = |v: &serde_json::Value| {
        v["rate_limits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                format!(
                    "{} {}",
                    l["limit"].as_str().unwrap(),
                    l["policy"].as_str().unwrap()
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        limits(&rule),
        ["600/minute everything-else", "100/second token"]
    );
    let own = env.check(tight.trim(), "/api/x");
    assert_eq!(
        limits(&own),
        ["5/minute token", "600/minute everything-else"]
    );
    let shown: serde_json::Value =
        serde_json::from_str(&env.ok(&["show", "tight", "--json"])).unwrap();
    assert_eq!(shown["rate_limit"], "5/minute");

    // Bad limits change nothing.
    let audit = env.audit_len();
    for bad in ["0/s", "5/day", "1000001/s", "5", "+1/s"] {
        let out = env.run(&["create", "bad", "--rate", bad], "");
        assert!(!out.status.success(), "--rate {bad} was accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("REQUESTS/PERIOD"),
            "{bad}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let public = limited.replace(
        "access = \"public\"",
        "access = \"public\"\nrate_limit = { requests = 5, per = \"second\" }",
    );
    std::fs::write(&file, public).unwrap();
    let error = env.fails(&["policy", "set", file.to_str().unwrap()], "");
    assert!(
        error.contains("public") && error.contains("policy.toml:"),
        "{error}"
    );
    assert_eq!(env.audit_len(), audit, "nothing was recorded");
    assert!(!env.ok(&["list"]).contains("bad"));

    // A Worker counts per minute only: a token's own per-second limit stops the push there.
    let error = env.fails(&["push", "worker", "--url", "http://127.0.0.1:9"], "");
    assert!(
        error.contains("\"roomy\"") && error.contains("per minute"),
        "{error}"
    );
    assert_eq!(env.audit_len(), audit, "no version was taken");
    // A revoked token's record carries no limit: its revocation is never held back.
    env.ok(&["revoke", "roomy", "--reason", "leaked"]);
    let out = env.dir.join("worker.json");
    env.ok(&[
        "bundle",
        "--target",
        "worker",
        "--out",
        out.to_str().unwrap(),
    ]);
    let published: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let tokens = published["payload"]["tokens"].as_array().unwrap();
    let roomy = tokens.iter().find(|t| t["name"] == "roomy").unwrap();
    assert!(
        roomy["revoked_at"].is_u64() && roomy.get("rate_limit").is_none(),
        "{roomy}"
    );
    // A limit is changed or removed in place, and audited.
    env.ok(&["limit", "tight", "--rate", "10/min"]);
    let shown: serde_json::Value =
        serde_json::from_str(&env.ok(&["show", "tight", "--json"])).unwrap();
    assert_eq!(shown["rate_limit"], "10/minute");
    env.ok(&["limit", "tight", "--none"]);
    let own = env.check(tight.trim(), "/api/x");
    assert_eq!(limits(&own), ["600/minute everything-else"]);
    let audit: serde_json::Value =
        serde_json::from_str(&env.ok(&["audit", "--json", "--limit", "2"])).unwrap();
    assert!(audit.to_string().contains("token.limit"), "{audit}");
    let error = env.fails(&["limit", "tight", "--none"], "");
    assert!(error.contains("nothing was changed"), "{error}");
    let audit = env.audit_len();
    for bad in [
        &["limit", "nobody", "--rate", "5/min"][..],
        &["limit", "tight", "--rate", "5/day"],
        &["limit", "tight"],
        &["limit", "tight", "--rate", "5/min", "--none"],
    ] {
        let out = env.run(bad, "");
        assert!(!out.status.success(), "{bad:?} was accepted");
        assert!(!out.stderr.is_empty(), "{bad:?}: no error");
    }
    assert_eq!(env.audit_len(), audit, "a refused limit changes nothing");
}

/// The claims of a compact JWT (its middle part), for what a user would read with `jq`.
fn claims_of(jwt: &str) -> serde_json::Value {
    let part = jwt.split('.').nth(1).unwrap();
    let mut bits = 0u32;
    let mut count = 0;
    let mut bytes = Vec::new();
    for c in part.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            _ => 63,
        };
        bits = bits << 6 | u32::from(v);
        count += 6;
        if count >= 8 {
            count -= 8;
            bytes.push((bits >> count) as u8);
        }
    }
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn signed_tokens_are_minted_within_their_issuer_and_revoked_by_jti() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new("signed");
    let key = env.dir.join("ci.key");
    let key_arg = key.to_str().unwrap();
    env.ok(&[
        "issuer",
        "add",
        "ci",
        "--scopes",
        "deploy:*,orders:read",
        "--max-ttl",
        "1h",
        "--key-out",
        key_arg,
    ]);
    let key_text = std::fs::read_to_string(&key).unwrap();
    assert!(
        key_text.starts_with("tokengate-issuer-key/v1 ci EdDSA "),
        "{key_text}"
    );
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let seed = key_text.split_whitespace().last().unwrap();
    let store = std::fs::read(env.store()).unwrap();
    assert!(
        !store.windows(seed.len()).any(|w| w == seed.as_bytes()),
        "the issuer key is in the store"
    );

    // mint prints the token alone; every gate (here `check`) accepts it with no push.
    let jwt = env.ok(&[
        "mint",
        "deploy-job",
        "--scopes",
        "orders:read",
        "--ttl",
        "30m",
        "--issuer-key-file",
        key_arg,
    ]);
    assert_eq!(jwt.lines().count(), 1);
    let jwt = jwt.trim().to_owned();
    let claims = claims_of(&jwt);
    assert_eq!(claims["sub"], "deploy-job");
    assert_eq!(claims["scope"], "orders:read");
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        1800
    );
    let checked = env.check(&jwt, "/x");
    assert_eq!(
        (checked["status"].as_u64(), checked["reason"].as_str()),
        (Some(200), Some("signed"))
    );
    assert_eq!(checked["subject"], "deploy-job");
    // Never stored or audited: only its jti.
    let audit = env.ok(&["audit", "--json"]);
    assert!(audit.contains("token.mint") && audit.contains(claims["jti"].as_str().unwrap()));
    let signature = jwt.rsplit('.').next().unwrap();
    assert!(
        !files_contain(&env.dir, signature),
        "the minted token is on disk"
    );

    // What the issuer may not grant, and keys that are not its own: refused, nothing changes.
    let before = env.audit_len();
    let admin_key = env.dir.join("tokengate.key");
    let refusals: [(&[&str], &str); 5] = [
        (&["--scopes", "admin", "--ttl", "30m"], "may not grant"),
        (&["--scopes", "orders:read", "--ttl", "2h"], "longer than issuer ci may grant"),
        (&["--scopes", "orders:read", "--ttl", "0s"], "at least 1s"),
        (&["--scopes", "orders:read", "--ttl", "1m", "--issuer-key-file", admin_key.to_str().unwrap()], "not an issuer key"),
        (&["--scopes", "orders:read", "--ttl", "1m", "--issuer-key-command", "echo tokengate-issuer-key/v1 ci EdDSA 0101010101010101010101010101010101010101010101010101010101010101"], "not the one issuer ci was added with"),
    ];
    for (args, why) in refusals {
        let mut all = vec!["mint", "someone"];
        all.extend_from_slice(args);
        if !args.iter().any(|a| a.starts_with("--issuer-key")) {
            all.extend_from_slice(&["--issuer-key-file", key_arg]);
        }
        let error = env.fails(&all, "");
        assert!(error.contains(why), "{all:?}: {error}");
    }
    // The issuer key signs no bundle; no issuer is added twice or for longer than a week.
    let error = env.fails(&["bundle", "--target", "envoy", "--key-file", key_arg], "");
    assert!(error.contains("not a private key"), "{error}");
    let issuer_refusals: [(&[&str], &str); 3] = [
        (
            &["ci", "--alg", "hs256", "--max-ttl", "1h"],
            "exists already",
        ),
        (&["long", "--alg", "hs256", "--max-ttl", "8d"], "1s to 7d"),
        (&["nokey", "--max-ttl", "1h"], "--key-out"),
    ];
    for (args, why) in issuer_refusals {
        let mut all = vec!["issuer", "add", "--scopes", "x:y"];
        all.extend_from_slice(args);
        let error = env.fails(&all, "");
        assert!(error.contains(why), "{all:?}: {error}");
    }
    assert_eq!(env.audit_len(), before, "a refusal changed something");

    // Revoked by jti: the gates refuse it from the next bundle; a second token still passes.
    let other = env.ok(&[
        "mint",
        "deploy-job",
        "--scopes",
        "deploy:prod",
        "--ttl",
        "10m",
        "--issuer-key-file",
        key_arg,
    ]);
    let jti = claims["jti"].as_str().unwrap();
    env.ok(&["revoke", "--jti", jti, "--reason", "leaked in a log"]);
    assert_eq!(env.check(&jwt, "/x")["reason"], "revoked");
    assert_eq!(env.check(other.trim(), "/x")["status"], 200);
    let error = env.fails(&["revoke", "--jti", jti, "--reason", "again"], "");
    assert!(error.contains("already revoked"), "{error}");
    let error = env.fails(
        &["revoke", "--jti", "minted-elsewhere", "--reason", "x"],
        "",
    );
    assert!(error.contains("--issuer"), "{error}");
    env.ok(&[
        "revoke",
        "--jti",
        "minted-elsewhere",
        "--issuer",
        "ci",
        "--reason",
        "x",
    ]);

    // An HS256 issuer: the gate needs its secret (TOKENGATE_ISSUER_SECRETS), never the bundle.
    let hs_key = env.dir.join("legacy.key");
    env.ok(&[
        "issuer",
        "add",
        "legacy",
        "--alg",
        "hs256",
        "--scopes",
        "orders:*",
        "--max-ttl",
        "15m",
        "--audience",
        "tokengate-test",
        "--key-out",
        hs_key.to_str().unwrap(),
    ]);
    let hs_text = std::fs::read_to_string(&hs_key).unwrap();
    let secret = hs_text.split_whitespace().last().unwrap().to_owned();
    let hs = env.ok(&[
        "mint",
        "batch",
        "--scopes",
        "orders:write",
        "--ttl",
        "5m",
        "--issuer-key-file",
        hs_key.to_str().unwrap(),
    ]);
    assert_eq!(
        claims_of(hs.trim())["aud"],
        "tokengate-test",
        "mint names the audience"
    );
    let bundle = env.ok(&["bundle", "--target", "envoy"]);
    assert!(
        bundle.contains("\"legacy\"") && !bundle.contains(&secret),
        "HS256 secret in a bundle"
    );
    assert_eq!(env.check(hs.trim(), "/x")["reason"], "issuer_unavailable");
    let with_secret = env
        .command(&["check", "--path", "/x", "--json"])
        .env("TOKENGATE_ISSUER_SECRETS", format!("legacy={secret}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(hs.trim().as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    let checked: serde_json::Value = serde_json::from_slice(&with_secret.stdout).unwrap();
    assert_eq!(
        (checked["reason"].as_str(), checked["subject"].as_str()),
        (Some("signed"), Some("batch"))
    );

    // Retired: its tokens are refused from the next bundle, and it mints no more.
    env.ok(&["issuer", "retire", "ci", "--reason", "moved to a new key"]);
    assert_eq!(env.check(other.trim(), "/x")["reason"], "unknown_issuer");
    let error = env.fails(
        &[
            "mint",
            "x",
            "--scopes",
            "orders:read",
            "--ttl",
            "1m",
            "--issuer-key-file",
            key_arg,
        ],
        "",
    );
    assert!(error.contains("retired"), "{error}");
    let listed: serde_json::Value =
        serde_json::from_str(&env.ok(&["issuer", "list", "--json"])).unwrap();
    let states: Vec<(String, bool)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["kid"].as_str().unwrap().to_owned(),
                i["retired_at"].is_null(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [("ci".to_owned(), false), ("legacy".to_owned(), true)]
    );
}
