//! `ccgate endpoints list|add|remove|enable|disable`: edit the config file (refusing an edit whose
//! result would not load), write it atomically, then tell the running gateway to reload.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use http::{Method, StatusCode};
use serde_json::Value;

use crate::cli::Exit;
use crate::cli::edit::{self, EditError};
use crate::cli::table::*;
use crate::cli::target::*;
use crate::config::Env;

/// One edit of the config file.
pub enum Edit {
    /// `add`.
    Add(edit::NewEndpoint),
    /// `remove NAME`.
    Remove(String),
    /// `enable NAME` / `disable NAME`.
    SetEnabled(String, bool),
}

impl Edit {
    fn apply(&self, text: &str) -> Result<String, EditError> {
        match self {
            Self::Add(ep) => edit::add(text, ep),
            Self::Remove(name) => edit::remove(text, name),
            Self::SetEnabled(name, on) => edit::set_enabled(text, name, *on),
        }
    }

    fn done(&self) -> String {
        match self {
            Self::Add(ep) => format!("added endpoint `{}`", ep.name),
            Self::Remove(name) => format!("removed endpoint `{name}`"),
            Self::SetEnabled(name, true) => format!("enabled endpoint `{name}`"),
            Self::SetEnabled(name, false) => format!("disabled endpoint `{name}`"),
        }
    }
}

/// What the running gateway made of an edit.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// `POST /_ccgate/reload` answered 200; a summary of what changed.
    Reloaded(String),
    /// The gateway has no reload, but its enable/disable switch took the change.
    Switched,
    /// The gateway refused the new config (its message).
    Refused(String),
    /// No gateway was reached (why).
    NotReached(String),
}

fn names_of(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Tells the gateway at `target` to reload its config; for `enable`/`disable`, also flips its
/// switch, so the change takes effect on a gateway without reload too.
pub async fn apply_to_running(target: Target, switch: Option<(&str, bool)>) -> Applied {
    let client = match AdminClient::new(target) {
        Ok(c) => c,
        Err(e) => return Applied::NotReached(format!("{e:#}")),
    };
    // Another server on the gateway's address is neither sent the token nor taken at its word.
    match client.is_ccgate().await {
        Ok(true) => {}
        Ok(false) => {
            return Applied::NotReached(format!(
                "{} is not a ccgate gateway: its GET /_ccgate/health answer is not ccgate's",
                client.url()
            ));
        }
        Err(e) => return Applied::NotReached(e.to_string()),
    }
    let reload = match client.call(Method::POST, "reload").await {
        Ok(a) => a,
        Err(e) => return Applied::NotReached(e.to_string()),
    };
    let flip = || async {
        let (name, on) = switch?;
        let action = if on { "enable" } else { "disable" };
        let a = client
            .call(Method::POST, &format!("endpoints/{name}/{action}"))
            .await
            .ok()?;
        (a.status == StatusCode::OK).then_some(())
    };
    match reload.status {
        StatusCode::OK => {
            // Idempotent, and makes sure the switch matches the file whatever reload did with
            // `enabled`.
            let _ = flip().await;
            let v = reload.json();
            let mut parts = Vec::new();
            for key in ["added", "removed", "changed"] {
                let names = names_of(&v[key]);
                if !names.is_empty() {
                    parts.push(format!("{key}: {}", names.join(", ")));
                }
            }
            if parts.is_empty() {
                parts.push("no endpoint changed".into());
            }
            Applied::Reloaded(parts.join("; "))
        }
        StatusCode::UNAUTHORIZED => {
            Applied::NotReached(format!("{} refused the access token", client.url()))
        }
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => {
            // The endpoint switch is runtime state, not config: still honour it.
            let _ = flip().await;
            Applied::Refused(reload.error_message())
        }
        status => match flip().await {
            Some(()) => Applied::Switched,
            None if status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED => {
                Applied::NotReached(format!(
                    "the gateway at {} cannot reload its config (an older ccgate?)",
                    client.url()
                ))
            }
            None => Applied::NotReached(format!(
                "{} answered the reload with {}",
                client.url(),
                reload.error_message()
            )),
        },
    }
}

/// `ccgate endpoints add|remove|enable|disable`: edits the file (refusing an edit whose result
/// would not load, leaving the file as it was), writes it atomically, and applies it to the
/// running gateway; when the running gateway refuses the edited file, it is restored as it was.
pub fn run_edit(
    explicit_config: Option<&Path>,
    url: Option<&str>,
    change: Edit,
    env: &dyn Env,
) -> anyhow::Result<()> {
    let path = config_path(explicit_config, env)?;
    // Held while the file is read, edited and written: another command's edit waits for it.
    // Not while the gateway is asked to reload, which may take long.
    let turn = edit::lock_for_edit(&path)
        .with_context(|| format!("cannot lock the directory of {}", path.display()))?;
    let text = match crate::config::read_capped(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} does not exist; create it with `ccgate init` (or pass --config)",
            path.display()
        ),
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    };
    let edited = change
        .apply(&text)
        .map_err(|e| anyhow!("{}: {e}; the file is unchanged", path.display()))?;
    let edited = edit::keep_line_endings(&text, edited);
    let loaded = Lenient::from_toml(&edited, "the edited config", env).map_err(|e| {
        // Line numbers would point into text that was never written: name the keys only.
        let mut msg = String::from("refusing the change: the config would not load afterwards:\n");
        for p in &e.problems {
            let _ = writeln!(msg, "  {}: {}", p.key, p.message);
        }
        let _ = write!(msg, "{} is unchanged", path.display());
        anyhow!(msg)
    })?;
    let mut out = std::io::stdout();
    if edited == text {
        writeln!(out, "{}: no change needed", path.display())?;
    } else {
        edit::write_atomic(&path, edited.as_bytes(), 0o600)
            .with_context(|| format!("cannot write {}", path.display()))?;
        writeln!(out, "{} in {}", change.done(), path.display())?;
        if edit::readable_by_others(&path) {
            eprintln!(
                "warning: {} can be read by other users; it may hold secrets: chmod 600 it",
                path.display()
            );
        }
    }
    for var in &loaded.unset {
        writeln!(
            out,
            "note: the environment variable {var} is not set here; the gateway needs it when it loads the file"
        )?;
    }
    let Some(target) = Target::from_lenient(&loaded, url)? else {
        writeln!(
            out,
            "saved; server.listen uses port 0, so the running gateway cannot be found: pass --url, restart it or send it SIGHUP"
        )?;
        return Ok(());
    };
    drop(turn);
    let url = target.url.clone();
    let switch = match &change {
        Edit::SetEnabled(name, on) => Some((name.as_str(), *on)),
        _ => None,
    };
    let applied = runtime()?.block_on(apply_to_running(target, switch));
    match applied {
        Applied::Reloaded(summary) if switch.is_none() => {
            writeln!(out, "applied to the running gateway at {url} ({summary})")?
        }
        Applied::Reloaded(_) | Applied::Switched => match switch {
            Some((name, on)) => writeln!(
                out,
                "applied to the running gateway at {url}: `{name}` is {} there",
                if on { "enabled" } else { "disabled" }
            )?,
            None => writeln!(out, "applied to the running gateway at {url}")?,
        },
        Applied::NotReached(why) => writeln!(
            out,
            "saved; the running gateway was not reached ({why}): restart it or send it SIGHUP"
        )?,
        Applied::Refused(why) => {
            // The gateway may see another environment than this shell (an `*_env` variable set
            // only here): a file it refuses would also fail every later SIGHUP and restart, so
            // the edit is taken back and the gateway's reason is shown as it gave it.
            let restored = if edited == text {
                Ok(())
            } else {
                restore_unless_changed(&path, &edited, &text)
            };
            writeln!(
                out,
                "the running gateway at {url} refused the edited config: {why}"
            )?;
            match restored {
                Ok(()) if edited != text => writeln!(
                    out,
                    "{} is restored as it was; the change is not made",
                    path.display()
                )?,
                Ok(()) => {}
                Err(e) => writeln!(
                    out,
                    "and {} could not be restored ({e}): fix it before the gateway reloads",
                    path.display()
                )?,
            }
            if let Some((name, on)) = switch {
                writeln!(
                    out,
                    "`{name}` is {} in the running gateway until it restarts",
                    if on { "enabled" } else { "disabled" }
                )?;
            }
            out.flush()?;
            return Err(Exit(1).into());
        }
    }
    Ok(())
}

/// `ccgate endpoints list`: the endpoints as the file declares them, secrets never shown.
pub fn list(explicit_config: Option<&Path>, env: &dyn Env) -> anyhow::Result<String> {
    let path = config_path(explicit_config, env)?;
    let text = crate::config::read_capped(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!(
                "{} does not exist; create it with `ccgate init` (or pass --config)",
                path.display()
            )
        } else {
            anyhow!("cannot read {}: {e}", path.display())
        }
    })?;
    let listed = edit::list(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let rows: Vec<Vec<String>> = listed
        .into_iter()
        .map(|l| {
            vec![
                l.name,
                hide_userinfo(&l.base_url),
                l.priority.to_string(),
                l.weight.to_string(),
                if l.enabled { "yes" } else { "no" }.to_string(),
                l.credential,
            ]
        })
        .collect();
    let mut out = format!("{}\n\n", path.display());
    if rows.is_empty() {
        out.push_str("no endpoints; add one with `ccgate endpoints add`\n");
    } else {
        out.push_str(&table(
            &[
                "NAME",
                "BASE URL",
                "PRIORITY",
                "WEIGHT",
                "ENABLED",
                "CREDENTIAL",
            ],
            &rows,
        ));
    }
    Ok(out)
}

/// A base URL as written, with any `user:password@` hidden: the file is listed as it is, invalid
/// entries included, and credentials in a URL (which the config refuses) must not be shown.
fn hide_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    // `user:pass@` in the authority, or a password with a `/` in it (`user:pa/ss@host`), which
    // ends the authority early as a parser reads it.
    let before_query = rest.find(['?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@').or_else(|| {
        rest[..before_query]
            .rfind('@')
            .filter(|&at| rest[..at].contains(':'))
    });
    match at {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// Puts `original` back in `path` if it still holds `edited` (another command may have edited
/// it since): under the edit lock, as every edit is.
fn restore_unless_changed(path: &Path, edited: &str, original: &str) -> std::io::Result<()> {
    let _turn = edit::lock_for_edit(path)?;
    match std::fs::read_to_string(path) {
        Ok(now) if now == edited => edit::write_atomic(path, original.as_bytes(), 0o600),
        Ok(_) => Err(std::io::Error::other(
            "it was edited again meanwhile; that edit is kept",
        )),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::hide_userinfo;

    #[test]
    fn userinfo_is_hidden_from_listed_urls() {
        for (written, shown) in [
            ("http://user:pw@h/p?q=1#f", "http://***@h/p?q=1#f"),
            ("https://pw@h:8443", "https://***@h:8443"),
            ("https://h/a@b", "https://h/a@b"),
            ("http://user:pa/ss@h/p", "http://***@h/p"),
            ("https://h", "https://h"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(hide_userinfo(written), shown, "{written}");
        }
    }
}
