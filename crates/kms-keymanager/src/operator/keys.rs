//! `keys list | inspect | prune | disable | enable | delete` (and `import | migrate`, in
//! `transfer`): the plugin's own discovery,
//! listing, sweep rules and deletion path, run by hand.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use clap::{Args, Subcommand};
use futures_util::future::join_all;
use keymanager_engine::KeyType;
use keymanager_engine::admin::{
    EntryState, KeyAdmin, KeyEntry, ListScope, ServedKey, hand_over_check, hand_over_entries,
    in_use_reason, inventory, plan_prune,
};
use keymanager_engine::kit::pem::public_key_pem;
use keymanager_engine::lifecycle::{KeyRecord, SweepDecision, SweepPolicy, SweeperIdentity};
use serde_json::json;

use super::output::{Progress, confirm, table, when, when_json};
use super::source::SourceArgs;
use super::{Failure, Opened, open};

/// Public keys fetched at once when listing other servers' keys.
const FETCH_CONCURRENCY: usize = 16;

/// `keys` subcommands.
#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// List this server's keys (or every server's in the trust domain).
    List(ListArgs),
    /// Everything about one key, its public key (PEM) and its access policy.
    Inspect(KeyArgs),
    /// Run the sweep's rules now and print every decision; --apply acts on them.
    Prune(PruneArgs),
    /// Disable a key in the store (it stays; signing with it fails until enabled).
    Disable(ChangeArgs),
    /// Enable a disabled key.
    Enable(ChangeArgs),
    /// Put a key on the store's deletion path (AWS: 7-day window; Cloud KMS: scheduled destroy).
    Delete(ChangeArgs),
    /// Import a private key under a SPIRE key id (bring your own key).
    Import(super::transfer::ImportArgs),
    /// Copy every key of a software store (disk) into another store, same public keys.
    Migrate(super::transfer::MigrateArgs),
}

/// Options every `keys` command takes.
#[derive(Args, Debug)]
pub struct Common {
    #[command(flatten)]
    source: SourceArgs,
    /// Stable JSON on stdout instead of a table (see README, "Operator CLI").
    #[arg(long)]
    json: bool,
}

/// `keys list`.
#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    common: Common,
    /// Every server's keys in the trust domain, not only this server's.
    #[arg(long)]
    all_servers: bool,
    /// Also replaced keys, leftovers and keys pending deletion.
    #[arg(long)]
    history: bool,
}

/// One key, by SPIRE key id or locator.
#[derive(Args, Debug)]
pub struct KeyArgs {
    #[command(flatten)]
    common: Common,
    /// A SPIRE key id (`x509-CA-A`) or a store locator (ARN, resource name).
    key: String,
    /// Whose key (default: this server's).
    #[arg(long, value_name = "ID")]
    server_id: Option<String>,
}

/// `keys prune`.
#[derive(Args, Debug)]
pub struct PruneArgs {
    #[command(flatten)]
    common: Common,
    /// Delete what the rules allow (default: a dry run).
    #[arg(long)]
    apply: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
}

/// `keys disable | enable | delete`.
#[derive(Args, Debug)]
pub struct ChangeArgs {
    #[command(flatten)]
    key: KeyArgs,
    /// Act even on a key a live server stamps or serves.
    #[arg(long)]
    force: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    Disable,
    Enable,
    Delete,
}

/// Runs a `keys` subcommand.
pub async fn run(command: KeysCommand) -> Result<(), Failure> {
    match command {
        KeysCommand::List(args) => list(args).await,
        KeysCommand::Inspect(args) => inspect(args).await,
        KeysCommand::Prune(args) => prune(args).await,
        KeysCommand::Disable(args) => change(args, Change::Disable).await,
        KeysCommand::Enable(args) => change(args, Change::Enable).await,
        KeysCommand::Delete(args) => change(args, Change::Delete).await,
        KeysCommand::Import(args) => super::transfer::import(args).await,
        KeysCommand::Migrate(args) => super::transfer::migrate(args).await,
    }
}

/// What discovery serves and the store lists, with public keys fetched for the keys in
/// `scope` that discovery does not serve.
async fn entries(
    opened: &Opened,
    scope: ListScope,
) -> Result<(Vec<ServedKey>, Vec<KeyEntry>), Failure> {
    let admin = &opened.admin;
    let me = admin.identity();
    let served = admin.served().await.map_err(Failure::store)?;
    let records = admin.records().await.map_err(Failure::store)?;
    let now = SystemTime::now();
    let first = inventory(
        now,
        me.as_ref(),
        opened.policy,
        &served,
        records.as_deref(),
        &HashMap::new(),
        scope,
    );
    let missing: Vec<String> = first
        .iter()
        .filter(|e| e.fingerprint.is_none() && e.state != EntryState::PendingDeletion)
        .map(|e| e.locator.clone())
        .collect();
    let public_keys = fetch_public_keys(admin.as_ref(), &missing).await;
    let mut entries = inventory(
        now,
        me.as_ref(),
        opened.policy,
        &served,
        records.as_deref(),
        &public_keys,
        scope,
    );
    if let Some(old) = &opened.old {
        let old_served = old.admin.served().await.map_err(|e| {
            Failure::store_message(format!("the migrate_from store ({}): {e}", old.store))
        })?;
        entries.extend(hand_over_entries(&served, &old_served));
    }
    Ok((served, entries))
}

async fn fetch_public_keys(
    admin: &dyn KeyAdmin,
    locators: &[String],
) -> HashMap<String, (KeyType, Arc<[u8]>)> {
    let mut progress = Progress::new("public keys read", locators.len());
    let mut found = HashMap::new();
    for batch in locators.chunks(FETCH_CONCURRENCY) {
        let results = join_all(batch.iter().map(|l| admin.public_key_at(l))).await;
        for (locator, result) in batch.iter().zip(results) {
            progress.tick();
            match result {
                Ok(key) => {
                    found.insert(locator.clone(), key);
                }
                Err(error) => {
                    tracing::warn!(key = %locator, %error, "cannot read the public key")
                }
            }
        }
    }
    found
}

fn entry_json(entry: &KeyEntry) -> serde_json::Value {
    json!({
        "key_id": entry.key_id,
        "server_id": entry.server_id,
        "key_type": entry.key_type.map(|t| t.as_str()),
        "fingerprint": entry.fingerprint,
        "locator": entry.locator,
        "created": when_json(entry.created),
        "last_stamp": when_json(entry.last_stamp),
        "replaced": when_json(entry.replaced),
        "replaced_by": entry.replaced_by,
        "store": if entry.old_store { "migrate_from" } else { "target" },
        "state": entry.state.as_str(),
        "stamped_live": entry.stamped_live,
        "served_here": entry.served_here,
    })
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

fn header_json(opened: &Opened) -> serde_json::Value {
    let me = opened.admin.identity();
    json!({
        "backend": opened.admin.backend(),
        "trust_domain": opened.trust_domain,
        "server_id": me.map(|m| m.server_id),
    })
}

async fn list(args: ListArgs) -> Result<(), Failure> {
    let opened = open(&args.common.source).await?;
    let scope = ListScope {
        all_servers: args.all_servers,
        history: args.history,
    };
    let (_, entries) = entries(&opened, scope).await?;
    if args.common.json {
        let mut out = header_json(&opened);
        out["keys"] = entries.iter().map(entry_json).collect();
        if let Some(old) = &opened.old {
            out["migrate_from"] = json!({
                "store": old.store,
                "backend": old.admin.backend(),
                "serving": entries.iter().filter(|e| e.old_store).count(),
            });
        }
        println!("{out:#}");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.key_id.clone().unwrap_or_else(|| "-".into()),
                e.server_id.clone().unwrap_or_else(|| "-".into()),
                e.key_type.map_or("-".into(), |t| t.to_string()),
                e.state.as_str().into(),
                yes_no(e.stamped_live),
                when(e.created),
                when(e.last_stamp),
                when(e.replaced),
                e.replaced_by.clone().unwrap_or_else(|| "-".into()),
                if e.old_store {
                    "migrate_from"
                } else {
                    "target"
                }
                .into(),
                e.fingerprint.clone().unwrap_or_else(|| "-".into()),
                e.locator.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "KEY ID",
                "SERVER",
                "TYPE",
                "STATE",
                "LIVE STAMP",
                "CREATED",
                "LAST STAMP",
                "REPLACED",
                "REPLACED BY",
                "STORE",
                "FINGERPRINT",
                "LOCATOR",
            ],
            &rows
        )
    );
    eprintln!(
        "{} key(s); backend {}, trust domain {}",
        entries.len(),
        opened.admin.backend(),
        opened.trust_domain
    );
    if let Some(old) = &opened.old {
        let from_old: Vec<KeyEntry> = entries.iter().filter(|e| e.old_store).cloned().collect();
        eprintln!("{}", hand_over_check(&old.store, &from_old).detail);
    }
    Ok(())
}

/// The one entry `args` names: a locator, or the current key of an id of a server.
fn select(
    entries: Vec<KeyEntry>,
    me: Option<&SweeperIdentity>,
    args: &KeyArgs,
) -> Result<KeyEntry, Failure> {
    if let Some(entry) = entries.iter().find(|e| e.locator == args.key) {
        return Ok(entry.clone());
    }
    let server = args
        .server_id
        .clone()
        .or_else(|| me.map(|m| m.server_id.clone()));
    let of_id: Vec<KeyEntry> = entries
        .into_iter()
        .filter(|e| e.key_id.as_deref() == Some(args.key.as_str()))
        .filter(|e| server.is_none() || e.server_id == server)
        .collect();
    let current: Vec<&KeyEntry> = of_id.iter().filter(|e| e.state.is_current()).collect();
    let whose = server
        .as_deref()
        .map_or(String::new(), |s| format!(" of server {s}"));
    match (current.as_slice(), of_id.as_slice()) {
        ([one], _) => Ok((*one).clone()),
        ([], []) => Err(Failure::not_found(format!(
            "no key {}{whose} in the store; `keys list --all-servers --history` shows what there is",
            args.key
        ))),
        ([], [one]) => Ok(one.clone()),
        ([], several) => Err(ambiguous(
            &args.key,
            &whose,
            "replaced instances and no current one",
            several.iter(),
        )),
        (several, _) => Err(ambiguous(
            &args.key,
            &whose,
            "current instances",
            several.iter().copied(),
        )),
    }
}

/// Several keys fit: the operator names one by its locator.
fn ambiguous<'a>(
    key: &str,
    whose: &str,
    what: &str,
    entries: impl ExactSizeIterator<Item = &'a KeyEntry>,
) -> Failure {
    let count = entries.len();
    let locators: Vec<&str> = entries.map(|e| e.locator.as_str()).collect();
    Failure::usage(format!(
        "key {key}{whose} has {count} {what}; name one by its locator: {}",
        locators.join(", ")
    ))
}

const ALL: ListScope = ListScope {
    all_servers: true,
    history: true,
};

async fn inspect(args: KeyArgs) -> Result<(), Failure> {
    let opened = open(&args.common.source).await?;
    let (_, entries) = entries(&opened, ALL).await?;
    let entry = select(entries, opened.admin.identity().as_ref(), &args)?;
    let pem = match opened.admin.public_key_at(&entry.locator).await {
        Ok((_, der)) => Some(public_key_pem(&der)),
        Err(error) => {
            tracing::warn!(%error, "cannot read the public key");
            None
        }
    };
    let access = opened
        .admin
        .access_summary(&entry.locator)
        .await
        .unwrap_or_else(|e| vec![format!("(cannot read: {e})")]);
    if args.common.json {
        let mut out = header_json(&opened);
        out["key"] = entry_json(&entry);
        out["public_key_pem"] = json!(pem);
        out["access"] = json!(access);
        println!("{out:#}");
        return Ok(());
    }
    let field = |name: &str, value: String| println!("{name:<14} {value}");
    field("key id", entry.key_id.clone().unwrap_or_else(|| "-".into()));
    field(
        "server id",
        entry.server_id.clone().unwrap_or_else(|| "-".into()),
    );
    field("type", entry.key_type.map_or("-".into(), |t| t.to_string()));
    field("state", entry.state.as_str().into());
    field("served here", yes_no(entry.served_here));
    field("live stamp", yes_no(entry.stamped_live));
    field("created", when(entry.created));
    field("last stamp", when(entry.last_stamp));
    field("replaced", when(entry.replaced));
    field(
        "replaced by",
        entry.replaced_by.clone().unwrap_or_else(|| "-".into()),
    );
    field(
        "store",
        if entry.old_store {
            "migrate_from (read-only)"
        } else {
            "target"
        }
        .into(),
    );
    field(
        "fingerprint",
        entry.fingerprint.clone().unwrap_or_else(|| "-".into()),
    );
    field("locator", entry.locator.clone());
    if access.is_empty() {
        field("access", "(no per-key policy in this store)".into());
    } else {
        println!("access");
        for line in &access {
            println!("  {line}");
        }
    }
    if let Some(pem) = pem {
        print!("{pem}");
    }
    Ok(())
}

async fn prune(args: PruneArgs) -> Result<(), Failure> {
    let opened = open(&args.common.source).await?;
    let admin = &opened.admin;
    let (Some(me), Some(records)) = (
        admin.identity(),
        admin.records().await.map_err(Failure::store)?,
    ) else {
        let message = format!(
            "the {} backend keeps only the keys it serves (written atomically): nothing is ever left to prune",
            admin.backend()
        );
        if args.common.json {
            let mut out = header_json(&opened);
            out["applied"] = json!(false);
            out["decisions"] = json!([]);
            out["note"] = json!(message);
            println!("{out:#}");
        } else {
            println!("{message}");
        }
        return Ok(());
    };
    let served = admin.served().await.map_err(Failure::store)?;
    let plan = plan_prune(SystemTime::now(), &me, opened.policy, &served, &records);
    let deletions = plan.iter().filter(|(_, d)| d.is_delete()).count();
    let mut results: HashMap<String, Result<(), String>> = HashMap::new();
    if args.apply && deletions > 0 {
        if !args.common.json {
            print_plan(&plan, &results);
        }
        let question = format!(
            "Delete {deletions} key(s) in trust domain {} ({})?",
            opened.trust_domain,
            admin.deletion_window()
        );
        if !args.yes && !confirm(&question) {
            return Err(Failure::usage(
                "not confirmed: nothing deleted (pass --yes to run without a terminal)",
            ));
        }
        let mut progress = Progress::new("keys put on the deletion path", deletions);
        for (record, decision) in &plan {
            if decision.is_delete() {
                let outcome = admin.delete(record).await.map_err(|e| e.to_string());
                progress.tick();
                results.insert(record.locator.clone(), outcome);
            }
        }
    }
    let failed = results.values().filter(|r| r.is_err()).count();
    if args.common.json {
        let mut out = header_json(&opened);
        out["applied"] = json!(args.apply);
        out["decisions"] = plan
            .iter()
            .map(|(record, decision)| decision_json(record, decision, results.get(&record.locator)))
            .collect();
        println!("{out:#}");
    } else {
        print_plan(&plan, &results);
        if args.apply {
            println!(
                "{} of {deletions} deletion(s) done; {}",
                deletions - failed,
                admin.deletion_window()
            );
        } else {
            println!("dry run: {deletions} key(s) would be deleted; --apply to act");
        }
    }
    if failed > 0 {
        return Err(Failure::store_message(format!(
            "{failed} deletion(s) failed; the plugin's next sweep retries them"
        )));
    }
    Ok(())
}

fn decision_json(
    record: &KeyRecord,
    decision: &SweepDecision,
    result: Option<&Result<(), String>>,
) -> serde_json::Value {
    let (action, reason) = match decision {
        SweepDecision::Delete { reason, .. } => ("delete", reason),
        SweepDecision::Keep { reason, .. } => ("keep", reason),
    };
    json!({
        "locator": record.locator,
        "key_id": record.key_id,
        "server_id": record.server_id,
        "action": action,
        "reason": reason,
        "result": match result {
            None => serde_json::Value::Null,
            Some(Ok(())) => json!("deleted"),
            Some(Err(e)) => json!(format!("failed: {e}")),
        },
    })
}

fn print_plan(plan: &[(KeyRecord, SweepDecision)], results: &HashMap<String, Result<(), String>>) {
    let rows: Vec<Vec<String>> = plan
        .iter()
        .map(|(record, decision)| {
            let (action, reason) = match decision {
                SweepDecision::Delete { reason, .. } => match results.get(&record.locator) {
                    Some(Ok(())) => ("DELETED", reason.clone()),
                    Some(Err(e)) => ("FAILED", format!("{reason}; {e}")),
                    None => ("DELETE", reason.clone()),
                },
                SweepDecision::Keep { reason, .. } => ("keep", reason.clone()),
            };
            vec![
                action.into(),
                record.key_id.clone().unwrap_or_else(|| "-".into()),
                record.server_id.clone().unwrap_or_else(|| "-".into()),
                record.locator.clone(),
                reason,
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["ACTION", "KEY ID", "SERVER", "LOCATOR", "REASON"], &rows)
    );
}

async fn change(args: ChangeArgs, change: Change) -> Result<(), Failure> {
    let opened = open(&args.key.common.source).await?;
    let admin = &opened.admin;
    let (_, entries) = entries(&opened, ALL).await?;
    let entry = select(entries, admin.identity().as_ref(), &args.key)?;
    let verb = match change {
        Change::Disable => "disable",
        Change::Enable => "enable",
        Change::Delete => "delete",
    };
    if entry.old_store {
        return Err(Failure::refused(format!(
            "refusing to {verb} {}: it is served from the migrate_from store, which this configuration only reads; change it with the old store's own configuration",
            entry.locator
        )));
    }
    if change != Change::Enable
        && let Some(reason) = in_use_reason(&entry)
        && !args.force
    {
        return Err(Failure::refused(format!(
            "refusing to {verb} {}: {reason}; pass --force if you are sure",
            entry.locator
        )));
    }
    let Some(record) = entry.record.clone() else {
        return Err(Failure::refused(format!(
            "the {} backend keeps only the keys it serves; it cannot {verb} one by hand (stop spire-server and edit its key store instead)",
            admin.backend()
        )));
    };
    if change == Change::Delete
        && !args.yes
        && !confirm(&format!(
            "Delete {} ({})?",
            entry.locator,
            admin.deletion_window()
        ))
    {
        return Err(Failure::usage(
            "not confirmed: nothing deleted (pass --yes to run without a terminal)",
        ));
    }
    let outcome = match change {
        Change::Disable => admin.set_enabled(&record, false).await,
        Change::Enable => admin.set_enabled(&record, true).await,
        Change::Delete => admin.delete(&record).await,
    };
    outcome.map_err(Failure::store)?;
    let done = match change {
        Change::Disable => "disabled".to_string(),
        Change::Enable => "enabled".to_string(),
        Change::Delete => admin.deletion_window().to_string(),
    };
    if args.key.common.json {
        let mut out = header_json(&opened);
        out["key"] = entry_json(&entry);
        out["action"] = json!(verb);
        out["result"] = json!(done);
        println!("{out:#}");
    } else {
        println!("{}: {done}", entry.locator);
    }
    Ok(())
}

/// The sweep policy of a configuration (SPIRE's defaults without a lifecycle).
pub fn policy_of(config: &keymanager_plugin::PluginConfig) -> SweepPolicy {
    config
        .backend
        .lifecycle()
        .map_or_else(SweepPolicy::default, |s| s.policy)
}
