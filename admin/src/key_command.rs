//! `tokengate key`: the admin's signing keys. The store keeps their public halves and
//! states; the private halves stay in the key source and are never printed.
//!
//! A rotation: `key rotate` adds a key (its private half appended to the key file) and from
//! then on bundles publish and are signed by both; once every gate has taken a push, `key
//! retire OLD` stops publishing the old key and removes it from the key file, and the next
//! push is signed by the new key alone. Gates never refuse a valid bundle on the way.

use std::path::Path;

use anyhow::{bail, Result};
use clap::Subcommand;

use crate::keys::{self, Source};
use crate::store::{self, Store};
use crate::{actor, print_table, time, Negative};

#[derive(Subcommand)]
pub enum KeyAction {
    /// Every key: id, state, created, public key.
    List {
        #[arg(long)]
        json: bool,
    },
    /// The published public keys, comma-separated: what a gate's TOKENGATE_TRUSTED_KEYS takes.
    Public,
    /// Make a new key (appended to the key file); bundles publish and are signed by both.
    Rotate {
        #[arg(long)]
        reason: Option<String>,
    },
    /// Stop publishing a key and drop its private half from the key file.
    Retire {
        /// The key id (`kid_…`, from `tokengate key list`).
        key_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

pub fn run(
    action: &KeyAction,
    store_path: &Path,
    source: &Source,
    who: &Option<String>,
    now: u64,
) -> Result<Option<Negative>> {
    match action {
        KeyAction::List { json } => {
            let store = Store::open(store_path)?;
            let keys = store.signing_keys()?;
            if *json {
                let rows: Vec<serde_json::Value> = keys
                    .iter()
                    .map(|k| {
                        serde_json::json!({
                            "key_id": k.key_id, "public_key": k.public_key, "state": k.state(),
                            "created_at": k.created_at, "retired_at": k.retired_at,
                        })
                    })
                    .collect();
                println_checked(&serde_json::to_string_pretty(&rows)?)?;
            } else {
                let mut rows = vec![["KEY ID", "STATE", "CREATED", "PUBLIC KEY"]
                    .map(str::to_owned)
                    .to_vec()];
                for k in &keys {
                    rows.push(vec![
                        k.key_id.clone(),
                        k.state().to_owned(),
                        time::format_instant(k.created_at),
                        k.public_key.clone(),
                    ]);
                }
                print_table(&rows)?;
            }
            Ok(None)
        }
        KeyAction::Public => {
            let store = Store::open(store_path)?;
            println_checked(&crate::published_key_set(&store)?.to_text())?;
            Ok(None)
        }
        KeyAction::Rotate { reason } => {
            let Source::File(path) = source else {
                bail!(
                    "key rotate adds the new private key to the key file, and the keys come from {source}: run it with --key-file on a 0600 copy of your keys (one per line), then store that file's new contents where the keys live"
                );
            };
            let ring = source.load()?;
            let mut store = Store::open(store_path)?;
            let key = keys::generate()?;
            let mut all: Vec<_> = ring.keys().collect();
            all.push(&key);
            let who = actor(who.clone(), reason.clone());
            let id = keys::id_of(&key);
            store.transaction(
                &who,
                "key.rotate",
                Some(&id),
                serde_json::json!({"public_key": keys::public_hex(&key)}),
                now,
                |tx| {
                    store::add_signing_key(tx, &id, &keys::public_hex(&key), now)?;
                    // Written inside the transaction: a failed write changes nothing.
                    keys::rewrite_file(path, &all)
                },
            )?;
            eprintln!(
                "new signing key {id} added to {}; bundles now publish and are signed by {}",
                path.display(),
                crate::published_key_set(&store)?.ids()
            );
            eprintln!("push to every gate, then: tokengate key retire <old key id>");
            Ok(None)
        }
        KeyAction::Retire { key_id, reason } => {
            let mut store = Store::open(store_path)?;
            let who = actor(who.clone(), reason.clone());
            let file = match source {
                Source::File(path) => Some((path, source.load()?)),
                _ => None,
            };
            store.transaction(
                &who,
                "key.retire",
                Some(key_id),
                serde_json::json!({}),
                now,
                |tx| {
                    store::retire_signing_key(tx, key_id, now)?;
                    if let Some((path, ring)) = &file {
                        let kept: Vec<_> =
                            ring.keys().filter(|k| keys::id_of(k) != *key_id).collect();
                        keys::rewrite_file(path, &kept)?;
                    }
                    Ok(())
                },
            )?;
            eprintln!(
                "key {key_id} retired; bundles now publish {}; push to every gate: a gate that has taken that push refuses anything {key_id} signs",
                crate::published_key_set(&store)?.ids()
            );
            if !matches!(source, Source::File(_)) {
                eprintln!("remove {key_id}'s private key from {source} too");
            }
            Ok(None)
        }
    }
}

/// One line on stdout; a failed write is an error.
fn println_checked(text: &str) -> Result<()> {
    use std::io::Write;
    writeln!(std::io::stdout().lock(), "{text}")?;
    Ok(())
}
