//! `keys import` (bring your own key) and `keys migrate` (every key of a software store into
//! another store, same public keys): both through the engine's own import, which names,
//! tags and publishes the key exactly as GenerateKey would have.

use std::path::{Path, PathBuf};

use clap::Args;
use keymanager_engine::admin::KeyAdmin;
use keymanager_engine::{ImportOutcome, Imported, KeyId, PrivateKeyMaterial};
use serde_json::json;
use zeroize::Zeroizing;

use super::output::table;
use super::source::SourceArgs;
use super::{Failure, open};

/// `keys import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// The SPIRE key id to import under (`x509-CA-A`, `JWT-Signer-B`, ...).
    #[arg(long, value_name = "ID")]
    key_id: String,
    /// The private key: PEM or DER; PKCS#8, SEC1 or PKCS#1; ec-p256, ec-p384, rsa-2048 or
    /// rsa-4096. Read once; the file is left as it is (destroy it yourself).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Refuse unless the configuration's server id is this one (a guard against importing
    /// into another server's keys).
    #[arg(long, value_name = "ID")]
    server_id: Option<String>,
    /// Replace the key the id has now (it is retired as a rotation retires it).
    #[arg(long)]
    replace: bool,
    /// Refuse unless the key's fingerprint (hex SHA-256 of its DER public key, as `keys
    /// list` prints it) is this one; checked before any store call.
    #[arg(long, value_name = "HEX")]
    expect_fingerprint: Option<String>,
    /// Stable JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// `keys migrate`.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The source's server.conf (a software store: `disk`).
    #[arg(long, value_name = "FILE", conflicts_with = "from_plugin_data")]
    from_server_conf: Option<PathBuf>,
    /// The source's plugin_data file (with --trust-domain).
    #[arg(long, value_name = "FILE")]
    from_plugin_data: Option<PathBuf>,
    /// The target's server.conf.
    #[arg(long, value_name = "FILE", conflicts_with = "to_plugin_data")]
    to_server_conf: Option<PathBuf>,
    /// The target's plugin_data file (with --trust-domain).
    #[arg(long, value_name = "FILE")]
    to_plugin_data: Option<PathBuf>,
    /// The trust domain, with --from-plugin-data / --to-plugin-data.
    #[arg(long, value_name = "TD")]
    trust_domain: Option<String>,
    /// Print the plan and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Replace a different key the target already serves under an id (retired as a
    /// rotation retires it); without it such an id is refused.
    #[arg(long)]
    replace: bool,
    /// Stable JSON on stdout.
    #[arg(long)]
    json: bool,
}

const DESTROY_HINT: &str = "the private key still exists outside the store; once the store serves it, destroy every other copy (e.g. `shred -u FILE`, and backups)";

/// Reads and parses the key file; the bytes are zeroed when dropped.
fn read_key(path: &Path) -> Result<PrivateKeyMaterial, Failure> {
    let bytes = Zeroizing::new(
        std::fs::read(path)
            .map_err(|e| Failure::usage(format!("cannot read {}: {e}", path.display())))?,
    );
    PrivateKeyMaterial::parse(&bytes)
        .map_err(|e| Failure::usage(format!("{}: {e}", path.display())))
}

fn key_id(text: &str) -> Result<KeyId, Failure> {
    KeyId::new(text).map_err(|_| Failure::usage("--key-id must not be empty"))
}

fn check_server(admin: &dyn KeyAdmin, expected: Option<&str>) -> Result<(), Failure> {
    let Some(expected) = expected else {
        return Ok(());
    };
    match admin.identity() {
        Some(me) if me.server_id == expected => Ok(()),
        Some(me) => Err(Failure::usage(format!(
            "--server-id {expected} does not match the configuration's server id {} (key_identifier_file / key_identifier_value)",
            me.server_id
        ))),
        None => Err(Failure::usage(format!(
            "--server-id: the {} backend has no server ids",
            admin.backend()
        ))),
    }
}

fn refuse_without_import(admin: &dyn KeyAdmin) -> Result<(), Failure> {
    if admin.can_import() {
        Ok(())
    } else {
        Err(Failure::refused(format!(
            "the {} backend cannot import key material (import works for disk, aws_kms and gcp_kms); to move keys into it without moving material, use the migrate_from hand-over mode",
            admin.backend()
        )))
    }
}

fn outcome_name(outcome: &ImportOutcome) -> &'static str {
    match outcome {
        ImportOutcome::Imported => "imported",
        ImportOutcome::Replaced(_) => "replaced",
        ImportOutcome::AlreadyServed => "already_served",
    }
}

fn imported_json(imported: &Imported) -> serde_json::Value {
    json!({
        "key_id": imported.public.id.as_str(),
        "key_type": imported.public.key_type.as_str(),
        "fingerprint": imported.public.fingerprint.as_str(),
        "locator": imported.locator,
        "outcome": outcome_name(&imported.outcome),
        "replaced_fingerprint": match &imported.outcome {
            ImportOutcome::Replaced(old) => Some(old.as_str()),
            _ => None,
        },
    })
}

/// Runs `keys import`.
pub async fn import(args: ImportArgs) -> Result<(), Failure> {
    let id = key_id(&args.key_id)?;
    let key = read_key(&args.key)?;
    if let Some(expected) = &args.expect_fingerprint {
        key.check_fingerprint(expected).map_err(Failure::refused)?;
    }
    let opened = open(&args.source).await?;
    let admin = opened.admin;
    check_server(admin.as_ref(), args.server_id.as_deref())?;
    refuse_without_import(admin.as_ref())?;
    let mut results = admin
        .import(&[(id, key)], args.replace)
        .await
        .map_err(|e| Failure::store_message(e.to_string()))?;
    let imported = results
        .pop()
        .ok_or_else(|| Failure::store_message("the import returned no result"))?
        .map_err(|e| Failure::store_message(e.to_string()))?;
    if args.json {
        println!("{}", imported_json(&imported));
    } else {
        let what = match &imported.outcome {
            ImportOutcome::Imported => "imported".to_string(),
            ImportOutcome::Replaced(old) => format!("imported, replacing {old} (retired)"),
            ImportOutcome::AlreadyServed => "already served: nothing to do".to_string(),
        };
        println!(
            "key {} ({}): {what}\nfingerprint {}\nlocator {}",
            imported.public.id,
            imported.public.key_type,
            imported.public.fingerprint,
            imported.locator
        );
    }
    eprintln!(
        "warning: {} still holds the private key: {DESTROY_HINT}",
        args.key.display()
    );
    Ok(())
}

fn side(
    server_conf: Option<&PathBuf>,
    plugin_data: Option<&PathBuf>,
    trust_domain: Option<&String>,
    which: &str,
) -> Result<SourceArgs, Failure> {
    match (server_conf, plugin_data) {
        (Some(conf), None) => Ok(SourceArgs {
            server_conf: Some(conf.to_path_buf()),
            plugin_data: None,
            trust_domain: None,
        }),
        (None, Some(data)) => match trust_domain {
            Some(td) => Ok(SourceArgs {
                server_conf: None,
                plugin_data: Some(data.to_path_buf()),
                trust_domain: Some(td.to_string()),
            }),
            None => Err(Failure::usage(format!(
                "--{which}-plugin-data needs --trust-domain"
            ))),
        },
        _ => Err(Failure::usage(format!(
            "say where the {which} configuration is: --{which}-server-conf FILE or --{which}-plugin-data FILE"
        ))),
    }
}

/// What `keys migrate` does with one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// The target serves no key under the id.
    Import,
    /// The target serves another key under the id (only with --replace).
    Replace,
    /// The target already serves this very key.
    Skip,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Self::Import => "import",
            Self::Replace => "replace",
            Self::Skip => "skip (already served by the target)",
        }
    }
}

/// Runs `keys migrate`.
pub async fn migrate(args: MigrateArgs) -> Result<(), Failure> {
    let from = side(
        args.from_server_conf.as_ref(),
        args.from_plugin_data.as_ref(),
        args.trust_domain.as_ref(),
        "from",
    )?;
    let to = side(
        args.to_server_conf.as_ref(),
        args.to_plugin_data.as_ref(),
        args.trust_domain.as_ref(),
        "to",
    )?;
    let source = open(&from).await?;
    let target = open(&to).await?;
    if source.trust_domain != target.trust_domain {
        return Err(Failure::usage(format!(
            "the source is trust domain {} and the target {}: a migration keeps one trust domain",
            source.trust_domain, target.trust_domain
        )));
    }
    let keys = source
        .admin
        .export()
        .await
        .map_err(|e| Failure::store_message(format!("reading the source's keys: {e}")))?
        .ok_or_else(|| {
            Failure::refused(format!(
                "the source is a {} store: its keys cannot leave it. Move to the new store without moving key material with the migrate_from hand-over mode (README, \"Hand-over mode\")",
                source.admin.backend()
            ))
        })?;
    refuse_without_import(target.admin.as_ref())?;
    let served = target.admin.served().await.map_err(Failure::store)?;
    let mut plan = Vec::with_capacity(keys.len());
    for (id, key) in &keys {
        let step = match served.iter().find(|s| s.key_id == id.as_str()) {
            None => Step::Import,
            Some(s)
                if keymanager_engine::Fingerprint::of_spki(&s.spki_der) == *key.fingerprint() =>
            {
                Step::Skip
            }
            Some(_) => Step::Replace,
        };
        plan.push(step);
    }
    let refused: Vec<&str> = keys
        .iter()
        .zip(&plan)
        .filter(|(_, step)| **step == Step::Replace)
        .map(|((id, _), _)| id.as_str())
        .collect();
    if !refused.is_empty() && !args.replace && !args.dry_run {
        return Err(Failure::refused(format!(
            "the target already serves other keys under {}: pass --replace to retire them in favour of the source's keys (SPIRE then serves the source's bundle)",
            refused.join(", ")
        )));
    }
    let rows: Vec<Vec<String>> = keys
        .iter()
        .zip(&plan)
        .map(|((id, key), step)| {
            vec![
                id.to_string(),
                key.key_type().to_string(),
                key.fingerprint().to_string(),
                step.name().to_string(),
            ]
        })
        .collect();
    if args.dry_run {
        if args.json {
            let items: Vec<_> = keys
                .iter()
                .zip(&plan)
                .map(|((id, key), step)| {
                    json!({"key_id": id.as_str(), "key_type": key.key_type().as_str(),
                           "fingerprint": key.fingerprint().as_str(), "step": format!("{step:?}").to_lowercase()})
                })
                .collect();
            println!(
                "{}",
                json!({"dry_run": true, "from": source.admin.backend(), "to": target.admin.backend(), "keys": items})
            );
        } else {
            println!(
                "plan: {} → {} (trust domain {}); nothing changed (--dry-run)",
                source.admin.backend(),
                target.admin.backend(),
                source.trust_domain
            );
            print!(
                "{}",
                table(&["KEY ID", "TYPE", "FINGERPRINT", "STEP"], &rows)
            );
        }
        return Ok(());
    }
    let todo: Vec<(KeyId, PrivateKeyMaterial)> = keys
        .into_iter()
        .zip(&plan)
        .filter(|(_, step)| **step != Step::Skip)
        .map(|(pair, _)| pair)
        .collect();
    let skipped = plan.iter().filter(|s| **s == Step::Skip).count();
    let results = if todo.is_empty() {
        Vec::new()
    } else {
        target
            .admin
            .import(&todo, args.replace)
            .await
            .map_err(|e| Failure::store_message(e.to_string()))?
    };
    let mut done = Vec::new();
    let mut failures = Vec::new();
    for ((id, _), result) in todo.iter().zip(results) {
        match result {
            Ok(imported) => done.push(imported),
            Err(error) => failures.push(format!("{id}: {error}")),
        }
    }
    if args.json {
        println!(
            "{}",
            json!({
                "from": source.admin.backend(),
                "to": target.admin.backend(),
                "imported": done.iter().map(imported_json).collect::<Vec<_>>(),
                "skipped": skipped,
                "failed": failures,
            })
        );
    } else {
        for imported in &done {
            println!(
                "{} ({}) {} → {}",
                imported.public.id,
                imported.public.key_type,
                imported.public.fingerprint,
                imported.locator
            );
        }
        println!(
            "{} imported, {skipped} already served by the target, {} failed",
            done.len(),
            failures.len()
        );
    }
    if !failures.is_empty() {
        return Err(Failure::store_message(format!(
            "some keys were not migrated (re-run to finish; keys already served are skipped): {}",
            failures.join("; ")
        )));
    }
    eprintln!(
        "next: point server.conf's KeyManager at the target and restart spire-server, then move the source's keys away; {DESTROY_HINT}"
    );
    Ok(())
}
