//! The admin's private Ed25519 keys: where they come from and what they sign.
//!
//! A source holds one or more private keys (64 hex characters each, one per line): a command
//! whose standard output is read (a secret manager), `TOKENGATE_SIGNING_KEY`, or the key file
//! (mode 0600, made by `init`). Keys are never taken from argv and never printed; the text
//! they were read from is wiped once parsed. The store keeps only public keys.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use ed25519_dalek::{Signer, SigningKey};
use tokengate_core::bundle::SignatureEntry;
use tokengate_core::hex;
use tokengate_core::keys::key_id;
use zeroize::Zeroizing;

/// The environment variable that may hold the private keys themselves.
pub const KEY_VARIABLE: &str = "TOKENGATE_SIGNING_KEY";

/// Where the private keys are read from.
#[derive(Debug, Clone)]
pub enum Source {
    /// `sh -c CMD`, its standard output.
    Command(String),
    /// [`KEY_VARIABLE`].
    Environment,
    /// The key file.
    File(PathBuf),
}

impl Source {
    /// The command if given, else the variable if set, else the file.
    pub fn resolve(command: Option<String>, file: PathBuf) -> Self {
        match command {
            Some(command) => Self::Command(command),
            None if std::env::var_os(KEY_VARIABLE).is_some() => Self::Environment,
            None => Self::File(file),
        }
    }

    /// Reads and parses every private key of the source.
    pub fn load(&self) -> Result<Keyring> {
        let text = Zeroizing::new(match self {
            Self::Command(command) => run_command(command)?,
            Self::Environment => std::env::var(KEY_VARIABLE)
                .with_context(|| format!("{KEY_VARIABLE} is not valid UTF-8"))?,
            Self::File(path) => {
                check_private(path)?;
                std::fs::read_to_string(path).with_context(|| {
                    format!(
                        "reading the signing key {} (or set {KEY_VARIABLE}, or pass --key-command)",
                        path.display()
                    )
                })?
            }
        });
        Keyring::parse(&text).with_context(|| self.to_string())
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Command(_) => f.write_str("the key command's output"),
            Self::Environment => f.write_str(KEY_VARIABLE),
            Self::File(path) => write!(f, "{}", path.display()),
        }
    }
}

pub(crate) fn run_command(command: &str) -> Result<String> {
    let output = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running the key command")?;
    if !output.status.success() {
        bail!("the key command failed ({})", output.status);
    }
    String::from_utf8(output.stdout).context("the key command's output is not UTF-8")
}

/// A key file readable by anyone but its owner is refused: it can sign anything.
pub(crate) fn check_private(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "no signing key at {} (run `tokengate init`, set {KEY_VARIABLE}, or pass --key-command)",
            path.display()
        )
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "{} is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    Ok(())
}

/// The private keys the admin holds now.
pub struct Keyring(Vec<SigningKey>);

impl Keyring {
    /// One 64-hex private key per non-empty line.
    pub fn parse(text: &str) -> Result<Self> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let Some(seed) = hex::decode::<32>(line).map(Zeroizing::new) else {
                // The line itself is never echoed: it may be most of a key.
                bail!(
                    "line {} is not a private key (64 lower-case hex characters)",
                    i + 1
                );
            };
            keys.push(SigningKey::from_bytes(&seed));
        }
        if keys.is_empty() {
            bail!("holds no private key");
        }
        Ok(Self(keys))
    }

    /// The keys, for rewriting the key file.
    pub fn keys(&self) -> impl Iterator<Item = &SigningKey> {
        self.0.iter()
    }

    /// The public keys (hex), in order.
    pub fn public_keys(&self) -> Vec<String> {
        self.0.iter().map(public_hex).collect()
    }

    /// Signs `message` with every key of `published` (hex) that this ring holds; at least one.
    pub fn sign(&self, message: &[u8], published: &[String]) -> Result<Vec<SignatureEntry>> {
        let signatures: Vec<SignatureEntry> = published
            .iter()
            .filter_map(|public| self.0.iter().find(|k| public_hex(k) == *public))
            .map(|key| SignatureEntry {
                key_id: key_id(key.verifying_key().as_bytes()),
                signature: hex::encode(&key.sign(message).to_bytes()),
            })
            .collect();
        if signatures.is_empty() {
            bail!(
                "none of the published keys is among the private keys given (tokengate key list shows which keys are published)"
            );
        }
        Ok(signatures)
    }

    /// A `Tokengate-Signature` value for a signed request to a gate at `t`: every published
    /// key this ring holds, over `<context>\n<t>\n<body>` (`tokengate_core::signed`).
    pub fn sign_request(
        &self,
        context: &str,
        t: u64,
        body: &[u8],
        published: &[String],
    ) -> Result<String> {
        let mut message = format!("{context}\n{t}\n").into_bytes();
        message.extend_from_slice(body);
        let signatures: Vec<String> = self
            .sign(&message, published)?
            .into_iter()
            .map(|s| format!("{}={}", s.key_id, s.signature))
            .collect();
        Ok(format!("t={t},{}", signatures.join(",")))
    }
}

/// A new private key from the OS CSPRNG.
pub fn generate() -> Result<SigningKey> {
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(seed.as_mut())
        .map_err(|e| anyhow::anyhow!("the OS random generator failed: {e}"))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The public key of a private key, hex.
pub fn public_hex(key: &SigningKey) -> String {
    hex::encode(key.verifying_key().as_bytes())
}

/// The key id of a private key.
pub fn id_of(key: &SigningKey) -> String {
    key_id(key.verifying_key().as_bytes())
}

/// Creates a key file (0600, must not exist) holding `key`.
pub fn create_file(path: &Path, key: &SigningKey) -> Result<()> {
    write_new_private(path, &key_file_text(&[key]))
}

/// Rewrites a key file to hold exactly `keys`, atomically (a 0600 temporary file renamed
/// over it).
pub fn rewrite_file(path: &Path, keys: &[&SigningKey]) -> Result<()> {
    check_private(path)?;
    let temporary = path.with_extension("key.new");
    std::fs::remove_file(&temporary).ok();
    write_new_private(&temporary, &key_file_text(keys))?;
    std::fs::rename(&temporary, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// The key file's text: one hex private key per line, wiped when dropped (sized up front, so
/// no reallocation leaves a copy behind).
fn key_file_text(keys: &[&SigningKey]) -> Zeroizing<String> {
    let mut text = Zeroizing::new(String::with_capacity(keys.len() * 65));
    for key in keys {
        text.push_str(&Zeroizing::new(hex::encode(key.as_bytes())));
        text.push('\n');
    }
    text
}

/// Writes `text` to a new file (mode 0600; it must not exist) and syncs it.
pub(crate) fn write_new_private(path: &Path, text: &str) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    Ok(())
}
