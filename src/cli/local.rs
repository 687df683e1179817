//! Commands that act on this host's state directly, without an agent: `apply` (one
//! engine pass and a verify pass), `wireguard rotate-key`, and the document helpers
//! `validate`, `diff` and `apply` share.

use super::*;

/// `converge wireguard rotate-key`: writes a new key file for the interface and prints
/// its public key; the agent watches the key directory and applies it at once. Refused
/// when the accepted document takes this interface's key from a secret.
pub(super) fn rotate_key(
    data_dir: &Path,
    interface: Option<String>,
    limits: &Limits,
) -> anyhow::Result<ExitCode> {
    let accepted = accepted_document(data_dir, limits)?;
    let section = accepted.as_ref().and_then(|d| d.wireguard.as_ref());
    let iface = match (interface, section) {
        (Some(i), _) => i,
        (None, Some(w)) => w.interface.clone(),
        (None, None) => anyhow::bail!(
            "the accepted document has no wireguard section; name the interface with --interface"
        ),
    };
    if !converge_wireguard::is_interface_name(&iface) {
        anyhow::bail!("{iface:?} is not an interface name (1-15 characters of [a-zA-Z0-9_=+.-])");
    }
    if let Some(w) = section.filter(|w| w.interface == iface) {
        if let Some(secret) = &w.private_key_secret {
            eprintln!(
                "refused: the document takes the key of {iface} from secret {secret:?}; replace that secret instead"
            );
            return Ok(ExitCode::from(1));
        }
    }
    crate::privacy::prepare_data_dir(data_dir)?;
    let public = converge_wireguard::rotate_key(data_dir, &iface)?;
    println!("{}", public.to_base64());
    let running = std::os::unix::net::UnixStream::connect(agent::socket_path(data_dir)).is_ok();
    eprintln!(
        "{iface}: new key written to {}; {}. Peers must get the new public key before they can handshake again.",
        converge_wireguard::key_path(data_dir, &iface).display(),
        if running {
            "the running agent sets it on the interface now"
        } else {
            "the agent sets it on the interface when it next runs"
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Secrets for one-shot commands: local files, then the document's sealed values opened
/// with this node's key (when it has one). Values stay in memory.
pub(super) fn secret_source(
    data_dir: &Path,
    host: &HostOptions,
    doc: &Document,
) -> anyhow::Result<converge_core::SecretSource> {
    let source = converge_core::SecretSource::new(&host.secrets_dir);
    if doc.secrets.as_ref().is_some_and(|s| !s.is_empty()) {
        let identity = crate::control::identity::Identity::load(data_dir)
            .context("the document has sealed secrets but this node has no sealing key")?;
        source.set_sealed(crate::control::sealed::open_all(
            identity.sealing_secret(),
            doc.secrets.as_ref(),
        )?);
    }
    Ok(source)
}

/// The accepted document, if the store has one that still parses.
pub(super) fn accepted_document(
    data_dir: &Path,
    limits: &Limits,
) -> anyhow::Result<Option<Document>> {
    let path = agent::store_path(data_dir);
    if !path.exists() {
        return Ok(None);
    }
    let store = Store::open(&path).context("open store")?;
    Ok(match store.last_good()? {
        Some((_, body)) => document::parse_with(&body, Format::Json, limits).ok(),
        None => None,
    })
}

pub(super) fn print_problems(
    file: &Path,
    problems: &converge_core::Problems,
    output: OutputFormat,
) {
    match output {
        OutputFormat::Text => eprint!(
            "{}",
            output::problems_text(&file.display().to_string(), problems)
        ),
        OutputFormat::Json => println!(
            "{}",
            serde_json::json!({"valid": false, "problems": problems})
        ),
    }
}

pub(super) fn load_valid(
    file: &Path,
    output: OutputFormat,
    limits: &Limits,
) -> anyhow::Result<Option<Document>> {
    match document::load(file, limits)? {
        Ok(d) => Ok(Some(d)),
        Err(problems) => {
            print_problems(file, &problems, output);
            Ok(None)
        }
    }
}

/// Sections present in the document whose reconciler this build does not have yet.
pub(super) fn unbuilt_sections(
    doc: &Document,
    sections: &[Arc<dyn crate::engine::Section>],
) -> Vec<&'static str> {
    registry::ALL
        .into_iter()
        .filter(|n| registry::has_section(doc, n) && !sections.iter().any(|s| s.name() == *n))
        .collect()
}

/// `converge apply`: store the document (refusing an older generation), converge once,
/// verify with a second dry pass, record statuses.
pub(super) async fn apply(
    data_dir: &Path,
    host: &HostOptions,
    file: &Path,
    output: OutputFormat,
    color: bool,
    limits: &Limits,
) -> anyhow::Result<ExitCode> {
    let Some(doc) = load_valid(file, output, limits)? else {
        return Ok(ExitCode::from(1));
    };
    crate::privacy::prepare_data_dir(data_dir)?;
    let mut store = Store::open(&agent::store_path(data_dir)).context("open store")?;
    let canonical = serde_json::to_string(&doc)?;
    match store.last_good()? {
        // Re-applying the accepted document repairs drift; anything else must be newer.
        Some((g, body)) if g == doc.generation && body == canonical => {}
        _ => {
            if let Err(e) = store.accept(doc.generation, &canonical) {
                eprintln!("refused: {e}");
                return Ok(ExitCode::from(1));
            }
        }
    }
    let mode = if doc.node.mode == Mode::Proxy {
        "proxy"
    } else {
        "worker"
    };
    let generation = doc.generation;
    let secrets = secret_source(data_dir, host, &doc)?;
    let sections = registry::sections(
        data_dir,
        host,
        &doc.node.id,
        EngineConfig::default().resync,
        &secrets,
    );
    let unbuilt = unbuilt_sections(&doc, &sections);
    let doc = Arc::new(doc);
    let applied = run_once(&sections, doc.clone(), false).await;
    let verify = run_once(&sections, doc, true).await;
    let mut degraded = false;
    let now = chrono::Utc::now();
    for (name, r) in &applied {
        let (state, message, errors) = crate::engine::judge_once(r, verify.get(name));
        degraded |= state == State::Degraded;
        if let PassResult::Ran { changes, .. } = r {
            store.journal(name, &journal(changes, &errors))?;
        }
        store.put_status(&ReconcilerStatus {
            reconciler: name.to_string(),
            state,
            message,
            observed_generation: Some(generation),
            last_transition: now,
            last_pass: Some(now),
            reason: Some(status::Reason::Document),
            object_errors: errors,
            waiting: match verify.get(name) {
                Some(PassResult::Ran { waiting, .. }) => status::waiting(waiting),
                _ => Vec::new(),
            },
            objects: match verify.get(name) {
                Some(PassResult::Ran { notes, .. }) => notes.clone(),
                _ => Vec::new(),
            },
            owned: match verify.get(name) {
                Some(PassResult::Ran { owned, .. }) => *owned,
                _ => None,
            },
        })?;
    }
    match output {
        OutputFormat::Text => {
            print!("{}", output::plan_text(&applied, &unbuilt, color));
            let statuses = store.statuses()?;
            println!();
            print!(
                "{}",
                output::status_text(Some(generation), &statuses, color)
            );
            println!("({mode} node)");
        }
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"generation": generation, "applied": output::plan_json(&applied), "reconcilers": store.statuses()?})
            )?
        ),
    }
    Ok(ExitCode::from(if degraded { 1 } else { 0 }))
}
