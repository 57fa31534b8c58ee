//! Hook profiles: the abstract actions a runbook asks of a site or a host, and the command
//! lines a profile maps them to.
//!
//! A command is a template per argument (and optionally for its standard input) with
//! placeholders `{service}`, `{site}`, `{host}`, `{staging}` and `{datadir}`; `{{` and `}}`
//! stand for literal braces. Templates are checked when the inventory is loaded: an unknown
//! placeholder, or one the action has no value for (`{staging}` in `policy_maintenance`), is
//! refused then, not when the step runs.
//!
//! Rendering produces an argv and never goes through a shell, so a value can only ever be
//! one argument (or part of one). Values are still restricted on top of that (names are
//! letters, digits, `_`, `-`, `.`; paths are absolute and add `/`, `+`, `@`, `%`, `:`, `,`,
//! `=`), so that a template that does call `sh -c` cannot be made to run something else
//! through a site, host or service name.
//!
//! # The `tungsten` profile
//!
//! `cctrl` reads its commands from standard input; a site's actions select the site's data
//! service with `use {service}` first (the service defaults to the site's name), one command
//! per line, run as `cctrl -multi`:
//!
//! | action | argv | stdin |
//! |---|---|---|
//! | `policy_maintenance` | `cctrl -multi` | `use {service}` / `set policy maintenance` |
//! | `policy_automatic` | `cctrl -multi` | `use {service}` / `set policy automatic` |
//! | `routers_offline` | `cctrl -multi` | `use {service}` / `router * offline` |
//! | `routers_online` | `cctrl -multi` | `use {service}` / `router * online` |
//! | `replicator_offline` | `trepctl -service {service} offline` | |
//! | `replicator_reset` | `trepctl -service {service} reset -all -y` | |
//! | `replicator_online` | `trepctl -service {service} online` | |
//! | `mark_primary` | `trepctl -service {service} setrole -role master` | |
//! | `database_stop` | `sudo -n systemctl stop mysqld` | |
//! | `database_start` | `sudo -n systemctl start mysqld` | |
//! | `prepare` | `xtrabackup --prepare --target-dir={staging}` (or `mariabackup …`) | |
//! | `backup` | `xtrabackup --backup --target-dir={staging} --datadir={datadir}` (or `mariabackup …`) | |
//!
//! Any of them can be replaced in the inventory's `[hooks.commands]` (the systemd unit in
//! particular differs between distributions). The `custom` profile has no built-ins: every
//! action's command must be given, except `backup`, which only a source of a backup method
//! needs (and which fails then, saying so, if it is missing).
//!
//! `backup` and `prepare` also run inside transfers of the `xtrabackup` and `mariabackup`
//! methods: the source backs up into a fresh directory of its own (`{staging}`) and sends it,
//! and each target prepares its verified copy (`{staging}`: its staging area) before the
//! commit. There `{site}` and `{service}` have no value: agents do not know their site.

use std::collections::BTreeMap;
use std::fmt;

/// A placeholder a command template may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Placeholder {
    /// A replication service (host actions) or the site's data service (site actions).
    Service,
    Site,
    Host,
    /// Where the restored backup waits before its commit (known only to the target's agent).
    Staging,
    /// The dataset's directory on the host (known only to the host's agent).
    Datadir,
}

impl Placeholder {
    pub const ALL: [Placeholder; 5] = [
        Placeholder::Service,
        Placeholder::Site,
        Placeholder::Host,
        Placeholder::Staging,
        Placeholder::Datadir,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Placeholder::Service => "service",
            Placeholder::Site => "site",
            Placeholder::Host => "host",
            Placeholder::Staging => "staging",
            Placeholder::Datadir => "datadir",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    fn is_path(self) -> bool {
        matches!(self, Placeholder::Staging | Placeholder::Datadir)
    }
}

impl fmt::Display for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{}}}", self.name())
    }
}

/// The backup tool whose restored copy `prepare` finishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackupTool {
    Xtrabackup,
    Mariabackup,
}

impl BackupTool {
    pub const ALL: [BackupTool; 2] = [BackupTool::Xtrabackup, BackupTool::Mariabackup];

    pub fn name(self) -> &'static str {
        match self {
            BackupTool::Xtrabackup => "xtrabackup",
            BackupTool::Mariabackup => "mariabackup",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl fmt::Display for BackupTool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a runbook asks a site or a host to do; a profile says how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HookAction {
    /// No automatic recovery on the site while the runbook works on it.
    PolicyMaintenance,
    PolicyAutomatic,
    /// No client traffic to the site.
    RoutersOffline,
    RoutersOnline,
    ReplicatorOffline,
    /// Forget the service's positions and logs, so that it starts from the restored data.
    ReplicatorReset,
    ReplicatorOnline,
    DatabaseStop,
    DatabaseStart,
    /// Make a restored backup consistent before it is committed.
    Prepare(BackupTool),
    /// Back the database up into `{staging}`: what a source of a backup method sends.
    Backup(BackupTool),
    /// Make the host its site's primary (the source the site's replicas follow).
    MarkPrimary,
}

/// Whether an action addresses a whole site or one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Site,
    Host,
}

/// One action per configuration key (`prepare` and `backup` stand for both tools).
const KEYED: [HookAction; 12] = [
    HookAction::PolicyMaintenance,
    HookAction::PolicyAutomatic,
    HookAction::RoutersOffline,
    HookAction::RoutersOnline,
    HookAction::ReplicatorOffline,
    HookAction::ReplicatorReset,
    HookAction::ReplicatorOnline,
    HookAction::DatabaseStop,
    HookAction::DatabaseStart,
    HookAction::Prepare(BackupTool::Xtrabackup),
    HookAction::MarkPrimary,
    HookAction::Backup(BackupTool::Xtrabackup),
];

impl HookAction {
    /// The action's key in `[hooks.commands]`.
    pub fn key(self) -> &'static str {
        match self {
            HookAction::PolicyMaintenance => "policy_maintenance",
            HookAction::PolicyAutomatic => "policy_automatic",
            HookAction::RoutersOffline => "routers_offline",
            HookAction::RoutersOnline => "routers_online",
            HookAction::ReplicatorOffline => "replicator_offline",
            HookAction::ReplicatorReset => "replicator_reset",
            HookAction::ReplicatorOnline => "replicator_online",
            HookAction::DatabaseStop => "database_stop",
            HookAction::DatabaseStart => "database_start",
            HookAction::Prepare(_) => "prepare",
            HookAction::MarkPrimary => "mark_primary",
            HookAction::Backup(_) => "backup",
        }
    }

    /// Every configuration key, in the order the docs list them.
    pub fn keys() -> impl Iterator<Item = &'static str> {
        KEYED.into_iter().map(HookAction::key)
    }

    /// The backup tool the action is for, if it is for one.
    pub fn tool(self) -> Option<BackupTool> {
        match self {
            HookAction::Prepare(t) | HookAction::Backup(t) => Some(t),
            _ => None,
        }
    }

    /// The action a key and a tool name name (as a `Hook` message carries them): a tool
    /// for the actions that need one, none for the others.
    pub fn from_key_and_tool(key: &str, tool: Option<&str>) -> Option<Self> {
        let actions = Self::for_key(key)?;
        match tool {
            None if actions.len() == 1 && actions[0].tool().is_none() => Some(actions[0]),
            None => None,
            Some(name) => {
                let tool = BackupTool::from_name(name)?;
                actions.iter().copied().find(|a| a.tool() == Some(tool))
            }
        }
    }

    /// The actions a configuration key configures (`prepare` and `backup` configure both
    /// tools).
    pub fn for_key(key: &str) -> Option<&'static [HookAction]> {
        const PREPARE: [HookAction; 2] = [
            HookAction::Prepare(BackupTool::Xtrabackup),
            HookAction::Prepare(BackupTool::Mariabackup),
        ];
        const BACKUP: [HookAction; 2] = [
            HookAction::Backup(BackupTool::Xtrabackup),
            HookAction::Backup(BackupTool::Mariabackup),
        ];
        match key {
            "prepare" => return Some(&PREPARE),
            "backup" => return Some(&BACKUP),
            _ => {}
        }
        let i = KEYED.iter().position(|a| a.key() == key)?;
        Some(&KEYED[i..=i])
    }

    pub fn scope(self) -> Scope {
        match self {
            HookAction::PolicyMaintenance
            | HookAction::PolicyAutomatic
            | HookAction::RoutersOffline
            | HookAction::RoutersOnline => Scope::Site,
            _ => Scope::Host,
        }
    }

    /// The placeholders this action has values for.
    pub fn placeholders(self) -> &'static [Placeholder] {
        use Placeholder::*;
        match self {
            HookAction::PolicyMaintenance
            | HookAction::PolicyAutomatic
            | HookAction::RoutersOffline
            | HookAction::RoutersOnline => &[Site, Service],
            HookAction::ReplicatorOffline
            | HookAction::ReplicatorReset
            | HookAction::ReplicatorOnline
            | HookAction::MarkPrimary => &[Host, Site, Service],
            HookAction::DatabaseStop | HookAction::DatabaseStart => &[Host, Site, Datadir],
            HookAction::Prepare(_) | HookAction::Backup(_) => &[Host, Site, Staging, Datadir],
        }
    }

    /// A few words for people: `replicator west_from_east reset`.
    pub fn describe(self, service: Option<&str>) -> String {
        let svc = service.unwrap_or("?");
        match self {
            HookAction::PolicyMaintenance => "policy maintenance".into(),
            HookAction::PolicyAutomatic => "policy automatic".into(),
            HookAction::RoutersOffline => "routers offline".into(),
            HookAction::RoutersOnline => "routers online".into(),
            HookAction::ReplicatorOffline => format!("replicator {svc} offline"),
            HookAction::ReplicatorReset => format!("replicator {svc} reset"),
            HookAction::ReplicatorOnline => format!("replicator {svc} online"),
            HookAction::DatabaseStop => "stop the database".into(),
            HookAction::DatabaseStart => "start the database".into(),
            HookAction::Prepare(BackupTool::Xtrabackup) => "prepare the xtrabackup copy".into(),
            HookAction::Prepare(BackupTool::Mariabackup) => "prepare the mariabackup copy".into(),
            HookAction::MarkPrimary => format!("mark primary for {svc}"),
            HookAction::Backup(BackupTool::Xtrabackup) => "back up with xtrabackup".into(),
            HookAction::Backup(BackupTool::Mariabackup) => "back up with mariabackup".into(),
        }
    }
}

/// A command template that could not be used, or a command that could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    #[error("unknown placeholder {{{name}}} in {template:?} (known: {{service}}, {{site}}, {{host}}, {{staging}}, {{datadir}})")]
    UnknownPlaceholder { name: String, template: String },
    #[error("{placeholder} has no value in {action} (it has {available})")]
    NotAvailable {
        placeholder: Placeholder,
        action: &'static str,
        available: String,
    },
    #[error("unclosed '{{' in {template:?}")]
    Unclosed { template: String },
    #[error("unmatched '}}' in {template:?} (write '}}}}' for a literal brace)")]
    StrayBrace { template: String },
    #[error("the command for {action} is empty: it needs at least a program")]
    EmptyCommand { action: &'static str },
    #[error("the command for {action} starts with a placeholder: name the program itself")]
    ProgramIsPlaceholder { action: &'static str },
    #[error("no value for {placeholder} to run {action}")]
    MissingValue {
        placeholder: Placeholder,
        action: &'static str,
    },
    #[error("refusing {placeholder} value {value:?}: {reason}")]
    UnsafeValue {
        placeholder: Placeholder,
        value: String,
        reason: &'static str,
    },
    #[error("the custom profile has no command for {}", missing.join(", "))]
    MissingCommands { missing: Vec<&'static str> },
    #[error("the profile has no command for {action}: add {action} = [...] to [hooks.commands]")]
    NoCommand { action: &'static str },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Value(Placeholder),
}

/// One argument (or the standard input) of a command, with its placeholders found.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template(Vec<Piece>);

impl Template {
    fn parse(text: &str, action: HookAction) -> Result<Self, HookError> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    lit.push('}');
                }
                '}' => {
                    return Err(HookError::StrayBrace {
                        template: text.into(),
                    })
                }
                '{' => {
                    let rest = &text[i + 1..];
                    let end = rest.find('}').ok_or_else(|| HookError::Unclosed {
                        template: text.into(),
                    })?;
                    let name = &rest[..end];
                    let p = Placeholder::from_name(name).ok_or_else(|| {
                        HookError::UnknownPlaceholder {
                            name: name.into(),
                            template: text.into(),
                        }
                    })?;
                    if !action.placeholders().contains(&p) {
                        return Err(HookError::NotAvailable {
                            placeholder: p,
                            action: action.key(),
                            available: list(action.placeholders()),
                        });
                    }
                    for _ in 0..=name.chars().count() {
                        chars.next();
                    }
                    if !lit.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut lit)));
                    }
                    pieces.push(Piece::Value(p));
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Text(lit));
        }
        Ok(Template(pieces))
    }

    /// Substitutes values; a missing one is an error unless `keep_missing`, which leaves
    /// `{name}` in place for a preview.
    fn render(
        &self,
        action: HookAction,
        ctx: &HookContext<'_>,
        keep_missing: bool,
    ) -> Result<String, HookError> {
        let mut out = String::new();
        for piece in &self.0 {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Value(p) => match ctx.value(*p) {
                    Some(v) => {
                        check_value(*p, v)?;
                        out.push_str(v);
                    }
                    None if keep_missing => out.push_str(&p.to_string()),
                    None => {
                        return Err(HookError::MissingValue {
                            placeholder: *p,
                            action: action.key(),
                        })
                    }
                },
            }
        }
        Ok(out)
    }
}

fn list(ps: &[Placeholder]) -> String {
    ps.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A command line for one action: one template per argument, and optionally its stdin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandTemplate {
    action: HookAction,
    argv: Vec<Template>,
    stdin: Option<Template>,
}

impl CommandTemplate {
    /// Checks a command for `action`: placeholders must exist and have a value in it.
    pub fn parse(
        action: HookAction,
        argv: &[String],
        stdin: Option<&str>,
    ) -> Result<Self, HookError> {
        let Some(program) = argv.first() else {
            return Err(HookError::EmptyCommand {
                action: action.key(),
            });
        };
        // The program comes from the config, never from a value.
        if program.starts_with('{') && !program.starts_with("{{") {
            return Err(HookError::ProgramIsPlaceholder {
                action: action.key(),
            });
        }
        Ok(CommandTemplate {
            action,
            argv: argv
                .iter()
                .map(|a| Template::parse(a, action))
                .collect::<Result<_, _>>()?,
            stdin: stdin.map(|s| Template::parse(s, action)).transpose()?,
        })
    }

    fn render(&self, ctx: &HookContext<'_>, keep_missing: bool) -> Result<HookCommand, HookError> {
        Ok(HookCommand {
            argv: self
                .argv
                .iter()
                .map(|t| t.render(self.action, ctx, keep_missing))
                .collect::<Result<_, _>>()?,
            stdin: self
                .stdin
                .as_ref()
                .map(|t| t.render(self.action, ctx, keep_missing))
                .transpose()?,
        })
    }
}

/// The values an action's placeholders take. Names come from the inventory; `staging` and
/// `datadir` from the agent's own configuration when it runs the step.
#[derive(Debug, Clone, Copy, Default)]
pub struct HookContext<'a> {
    pub site: Option<&'a str>,
    pub service: Option<&'a str>,
    pub host: Option<&'a str>,
    pub staging: Option<&'a str>,
    pub datadir: Option<&'a str>,
}

impl HookContext<'_> {
    fn value(&self, p: Placeholder) -> Option<&str> {
        match p {
            Placeholder::Service => self.service,
            Placeholder::Site => self.site,
            Placeholder::Host => self.host,
            Placeholder::Staging => self.staging,
            Placeholder::Datadir => self.datadir,
        }
    }
}

/// Site, host and service names: what the inventory accepts and what rendering re-checks.
pub(crate) fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 64 {
        return Err("a name is 1 to 64 characters");
    }
    if name.starts_with(['-', '.']) {
        return Err("a name must not start with '-' or '.'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err("a name is letters, digits, '_', '-' and '.'");
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') || path.len() > 4096 {
        return Err("a path must be absolute and at most 4096 bytes");
    }
    if path.split('/').any(|c| c == "..") {
        return Err("a path must not contain '..'");
    }
    if !path.bytes().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'/' | b'_' | b'-' | b'.' | b'+' | b'@' | b'%' | b':' | b',' | b'='
            )
    }) {
        return Err("a path is letters, digits and '/_-.+@%:,='");
    }
    Ok(())
}

fn check_value(p: Placeholder, value: &str) -> Result<(), HookError> {
    let checked = if p.is_path() {
        check_path(value)
    } else {
        check_name(value)
    };
    checked.map_err(|reason| HookError::UnsafeValue {
        placeholder: p,
        value: value.into(),
        reason,
    })
}

/// A command ready to run: no shell between it and the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookCommand {
    pub argv: Vec<String>,
    /// Written to the program's standard input, which is then closed.
    pub stdin: Option<String>,
}

impl fmt::Display for HookCommand {
    /// Shell-quoted argv, then the stdin escaped as a Rust string: for people, not a shell.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.argv.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            let plain = !a.is_empty()
                && a.bytes().all(|b| {
                    b.is_ascii_alphanumeric()
                        || matches!(
                            b,
                            b'/' | b'_' | b'-' | b'.' | b'=' | b':' | b',' | b'@' | b'%' | b'+'
                        )
                });
            if plain {
                f.write_str(a)?;
            } else {
                write!(f, "'{}'", a.replace('\'', r"'\''"))?;
            }
        }
        if let Some(s) = &self.stdin {
            write!(f, " <<< {s:?}")?;
        }
        Ok(())
    }
}

/// Which set of built-in commands a profile starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileKind {
    /// Tungsten Cluster: `cctrl` and `trepctl` (see the module docs).
    Tungsten,
    /// Every command from the inventory.
    Custom,
}

impl ProfileKind {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "tungsten" => Some(ProfileKind::Tungsten),
            "custom" => Some(ProfileKind::Custom),
            _ => None,
        }
    }
}

/// The command line of every action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookProfile {
    kind: ProfileKind,
    commands: BTreeMap<HookAction, CommandTemplate>,
}

fn tungsten_builtin(action: HookAction) -> (&'static [&'static str], Option<&'static str>) {
    const CCTRL: &[&str] = &["cctrl", "-multi"];
    match action {
        HookAction::PolicyMaintenance => (CCTRL, Some("use {service}\nset policy maintenance\n")),
        HookAction::PolicyAutomatic => (CCTRL, Some("use {service}\nset policy automatic\n")),
        HookAction::RoutersOffline => (CCTRL, Some("use {service}\nrouter * offline\n")),
        HookAction::RoutersOnline => (CCTRL, Some("use {service}\nrouter * online\n")),
        HookAction::ReplicatorOffline => (&["trepctl", "-service", "{service}", "offline"], None),
        HookAction::ReplicatorReset => (
            &["trepctl", "-service", "{service}", "reset", "-all", "-y"],
            None,
        ),
        HookAction::ReplicatorOnline => (&["trepctl", "-service", "{service}", "online"], None),
        HookAction::MarkPrimary => (
            &[
                "trepctl",
                "-service",
                "{service}",
                "setrole",
                "-role",
                "master",
            ],
            None,
        ),
        HookAction::DatabaseStop => (&["sudo", "-n", "systemctl", "stop", "mysqld"], None),
        HookAction::DatabaseStart => (&["sudo", "-n", "systemctl", "start", "mysqld"], None),
        HookAction::Prepare(BackupTool::Xtrabackup) => {
            (&["xtrabackup", "--prepare", "--target-dir={staging}"], None)
        }
        HookAction::Prepare(BackupTool::Mariabackup) => (
            &["mariabackup", "--prepare", "--target-dir={staging}"],
            None,
        ),
        HookAction::Backup(BackupTool::Xtrabackup) => (
            &[
                "xtrabackup",
                "--backup",
                "--target-dir={staging}",
                "--datadir={datadir}",
            ],
            None,
        ),
        HookAction::Backup(BackupTool::Mariabackup) => (
            &[
                "mariabackup",
                "--backup",
                "--target-dir={staging}",
                "--datadir={datadir}",
            ],
            None,
        ),
    }
}

impl HookProfile {
    /// A profile from its kind and the commands the inventory gives (keyed by action;
    /// for `tungsten` they replace built-ins, for `custom` every action needs one).
    pub fn new(
        kind: ProfileKind,
        mut given: BTreeMap<HookAction, CommandTemplate>,
    ) -> Result<Self, HookError> {
        let all = KEYED.into_iter().chain([
            HookAction::Prepare(BackupTool::Mariabackup),
            HookAction::Backup(BackupTool::Mariabackup),
        ]);
        match kind {
            ProfileKind::Tungsten => {
                for action in all {
                    if let std::collections::btree_map::Entry::Vacant(e) = given.entry(action) {
                        let (argv, stdin) = tungsten_builtin(action);
                        let argv: Vec<String> = argv.iter().map(|s| (*s).to_owned()).collect();
                        e.insert(CommandTemplate::parse(action, &argv, stdin)?);
                    }
                }
            }
            ProfileKind::Custom => {
                // Only a source of a backup method needs `backup`; it says so then.
                let mut missing: Vec<&'static str> = all
                    .filter(|a| !matches!(a, HookAction::Backup(_)) && !given.contains_key(a))
                    .map(HookAction::key)
                    .collect();
                missing.dedup();
                if !missing.is_empty() {
                    return Err(HookError::MissingCommands { missing });
                }
            }
        }
        Ok(HookProfile {
            kind,
            commands: given,
        })
    }

    /// The `tungsten` profile with no changes.
    pub fn tungsten() -> Result<Self, HookError> {
        Self::new(ProfileKind::Tungsten, BTreeMap::new())
    }

    pub fn kind(&self) -> ProfileKind {
        self.kind
    }

    /// Whether the action's command uses `placeholder` (in an argument or its stdin): an
    /// agent works out a value only when it is needed.
    pub fn uses(&self, action: HookAction, placeholder: Placeholder) -> bool {
        self.commands.get(&action).is_some_and(|c| {
            c.argv
                .iter()
                .chain(c.stdin.as_ref())
                .any(|t| t.0.contains(&Piece::Value(placeholder)))
        })
    }

    /// Whether the profile has a command for `action` (a custom one may lack `backup`).
    pub fn has(&self, action: HookAction) -> bool {
        self.commands.contains_key(&action)
    }

    fn template(&self, action: HookAction) -> Result<&CommandTemplate, HookError> {
        self.commands.get(&action).ok_or(HookError::NoCommand {
            action: action.key(),
        })
    }

    /// The command to run, every placeholder filled in and checked.
    pub fn render(
        &self,
        action: HookAction,
        ctx: &HookContext<'_>,
    ) -> Result<HookCommand, HookError> {
        self.template(action)?.render(ctx, false)
    }

    /// As [`render`](Self::render), but placeholders without a value (`{staging}` before an
    /// agent has one) stay as they are: for dry runs.
    pub fn preview(
        &self,
        action: HookAction,
        ctx: &HookContext<'_>,
    ) -> Result<HookCommand, HookError> {
        self.template(action)?.render(ctx, true)
    }
}

/// A command as written in a `[hooks.commands]` table: `["prog", "arg"]`, or
/// `{ argv = ["prog"], stdin = "..." }`.
#[derive(Debug, Clone)]
pub(crate) struct RawCommand {
    pub argv: Vec<String>,
    pub stdin: Option<String>,
}

impl<'de> serde::Deserialize<'de> for RawCommand {
    // By hand rather than `untagged`, whose error says only that nothing matched.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
        use serde::Deserialize;

        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct WithStdin {
            argv: Vec<String>,
            stdin: Option<String>,
        }

        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawCommand;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "an array of strings (the argv), or a table { argv = [...], stdin = \"...\" }",
                )
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<RawCommand, A::Error> {
                let argv = Vec::deserialize(SeqAccessDeserializer::new(seq))?;
                Ok(RawCommand { argv, stdin: None })
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawCommand, A::Error> {
                let w = WithStdin::deserialize(MapAccessDeserializer::new(map))?;
                Ok(RawCommand {
                    argv: w.argv,
                    stdin: w.stdin,
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The `[hooks.commands]` table as written: command by action key, with where each is.
pub(crate) type RawCommands = BTreeMap<toml::Spanned<String>, toml::Spanned<RawCommand>>;

/// A `[hooks]` table that could not be used: what is wrong, and where in the file (a byte
/// range, which the caller turns into a line number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableError {
    pub span: std::ops::Range<usize>,
    pub message: String,
}

/// Builds the profile a `[hooks]` table describes (`profile` and `[hooks.commands]`): what
/// the inventory and every agent's configuration share.
pub(crate) fn profile_from_table(
    profile: &toml::Spanned<String>,
    commands: &RawCommands,
) -> Result<HookProfile, TableError> {
    let kind = ProfileKind::from_name(profile.get_ref()).ok_or_else(|| TableError {
        span: profile.span(),
        message: format!(
            "[hooks] profile {:?} must be \"tungsten\" or \"custom\"",
            profile.get_ref()
        ),
    })?;
    let mut given = BTreeMap::new();
    // In file order, so that the first mistake in the file is the one reported.
    let mut in_order: Vec<_> = commands.iter().collect();
    in_order.sort_by_key(|(k, _)| k.span().start);
    for (key, cmd) in in_order {
        let actions = HookAction::for_key(key.get_ref()).ok_or_else(|| TableError {
            span: key.span(),
            message: format!(
                "[hooks.commands] {:?} is not an action (actions: {})",
                key.get_ref(),
                HookAction::keys().collect::<Vec<_>>().join(", ")
            ),
        })?;
        let RawCommand { argv, stdin } = cmd.get_ref();
        for &action in actions {
            let t =
                CommandTemplate::parse(action, argv, stdin.as_deref()).map_err(|e| TableError {
                    span: cmd.span(),
                    message: format!("[hooks.commands] {}: {e}", key.get_ref()),
                })?;
            given.insert(action, t);
        }
    }
    HookProfile::new(kind, given).map_err(|e| TableError {
        span: profile.span(),
        message: format!("[hooks] {e}"),
    })
}

/// Shared by the tests of the configs that hold a `[hooks]` table.
#[cfg(test)]
pub(crate) mod testutil {
    /// A `[hooks.commands]` table with a command for every action, each recording its name.
    pub const ALL_COMMANDS: &str = r#"policy_maintenance = ["/opt/rec", "policy-maintenance", "{site}"]
policy_automatic = ["/opt/rec", "policy-automatic", "{site}"]
routers_offline = ["/opt/rec", "routers-offline", "{site}"]
routers_online = ["/opt/rec", "routers-online", "{site}"]
replicator_offline = ["/opt/rec", "replicator-offline", "{service}"]
replicator_reset = ["/opt/rec", "replicator-reset", "{service}"]
replicator_online = ["/opt/rec", "replicator-online", "{service}"]
database_stop = ["/opt/rec", "database-stop", "{datadir}"]
database_start = ["/opt/rec", "database-start", "{datadir}"]
prepare = { argv = ["/opt/rec", "prepare"], stdin = "{staging}\n" }
mark_primary = ["/opt/rec", "mark-primary", "{host}"]
backup = ["/opt/rec", "backup", "{datadir}", "{staging}"]
"#;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| (*s).to_owned()).collect()
    }

    fn site(site: &'static str, service: &'static str) -> HookContext<'static> {
        HookContext {
            site: Some(site),
            service: Some(service),
            ..HookContext::default()
        }
    }

    fn host(host: &'static str, site: &'static str, service: &'static str) -> HookContext<'static> {
        HookContext {
            site: Some(site),
            service: Some(service),
            host: Some(host),
            staging: Some("/var/lib/mover/staging/t1"),
            datadir: Some("/var/lib/mysql"),
        }
    }

    fn golden(action: HookAction, ctx: &HookContext<'_>) -> (Vec<String>, Option<String>) {
        let c = HookProfile::tungsten()
            .unwrap()
            .render(action, ctx)
            .unwrap();
        (c.argv, c.stdin)
    }

    #[test]
    fn tungsten_site_actions_golden() {
        let east = site("east", "east");
        let cases = [
            (
                HookAction::PolicyMaintenance,
                "use east\nset policy maintenance\n",
            ),
            (HookAction::RoutersOffline, "use east\nrouter * offline\n"),
            (HookAction::RoutersOnline, "use east\nrouter * online\n"),
            (
                HookAction::PolicyAutomatic,
                "use east\nset policy automatic\n",
            ),
        ];
        for (action, stdin) in cases {
            assert_eq!(
                golden(action, &east),
                (argv(&["cctrl", "-multi"]), Some(stdin.to_owned())),
                "{action:?}"
            );
        }
    }

    #[test]
    fn tungsten_host_actions_golden() {
        let w = host("west1", "west", "west_from_east");
        let none = None::<String>;
        assert_eq!(
            golden(HookAction::ReplicatorOffline, &w),
            (
                argv(&["trepctl", "-service", "west_from_east", "offline"]),
                none.clone()
            )
        );
        assert_eq!(
            golden(HookAction::ReplicatorReset, &w),
            (
                argv(&[
                    "trepctl",
                    "-service",
                    "west_from_east",
                    "reset",
                    "-all",
                    "-y"
                ]),
                none.clone()
            )
        );
        assert_eq!(
            golden(HookAction::ReplicatorOnline, &w),
            (
                argv(&["trepctl", "-service", "west_from_east", "online"]),
                none.clone()
            )
        );
        let e = host("east1", "east", "east");
        assert_eq!(
            golden(HookAction::MarkPrimary, &e),
            (
                argv(&["trepctl", "-service", "east", "setrole", "-role", "master"]),
                none.clone()
            )
        );
        assert_eq!(
            golden(HookAction::DatabaseStop, &e),
            (
                argv(&["sudo", "-n", "systemctl", "stop", "mysqld"]),
                none.clone()
            )
        );
        assert_eq!(
            golden(HookAction::DatabaseStart, &e),
            (
                argv(&["sudo", "-n", "systemctl", "start", "mysqld"]),
                none.clone()
            )
        );
        assert_eq!(
            golden(HookAction::Prepare(BackupTool::Xtrabackup), &e),
            (
                argv(&[
                    "xtrabackup",
                    "--prepare",
                    "--target-dir=/var/lib/mover/staging/t1"
                ]),
                none.clone()
            )
        );
        assert_eq!(
            golden(HookAction::Prepare(BackupTool::Mariabackup), &e),
            (
                argv(&[
                    "mariabackup",
                    "--prepare",
                    "--target-dir=/var/lib/mover/staging/t1"
                ]),
                none.clone()
            )
        );
        assert_eq!(
            golden(HookAction::Backup(BackupTool::Xtrabackup), &e),
            (
                argv(&[
                    "xtrabackup",
                    "--backup",
                    "--target-dir=/var/lib/mover/staging/t1",
                    "--datadir=/var/lib/mysql"
                ]),
                none.clone()
            )
        );
        assert_eq!(
            golden(HookAction::Backup(BackupTool::Mariabackup), &e),
            (
                argv(&[
                    "mariabackup",
                    "--backup",
                    "--target-dir=/var/lib/mover/staging/t1",
                    "--datadir=/var/lib/mysql"
                ]),
                none
            )
        );
    }

    #[test]
    fn display_is_quoted_for_people() {
        let p = HookProfile::tungsten().unwrap();
        let c = p
            .render(HookAction::RoutersOffline, &site("east", "east"))
            .unwrap();
        assert_eq!(
            c.to_string(),
            r#"cctrl -multi <<< "use east\nrouter * offline\n""#
        );
        let c = HookCommand {
            argv: argv(&["sh", "-c", "echo it's"]),
            stdin: None,
        };
        assert_eq!(c.to_string(), r"sh -c 'echo it'\''s'");
    }

    #[test]
    fn overrides_replace_only_what_they_name() {
        let stop = CommandTemplate::parse(
            HookAction::DatabaseStop,
            &argv(&["systemctl", "stop", "mariadb"]),
            None,
        )
        .unwrap();
        let p = HookProfile::new(
            ProfileKind::Tungsten,
            BTreeMap::from([(HookAction::DatabaseStop, stop)]),
        )
        .unwrap();
        let e = host("east1", "east", "east");
        assert_eq!(
            p.render(HookAction::DatabaseStop, &e).unwrap().argv,
            argv(&["systemctl", "stop", "mariadb"])
        );
        assert_eq!(
            p.render(HookAction::DatabaseStart, &e).unwrap().argv,
            argv(&["sudo", "-n", "systemctl", "start", "mysqld"])
        );
    }

    #[test]
    fn custom_needs_every_action() {
        let rec = |a: HookAction| {
            CommandTemplate::parse(a, &argv(&["/opt/record", a.key(), "{site}"]), None).unwrap()
        };
        let mut given: BTreeMap<_, _> = KEYED
            .into_iter()
            .filter(|a| *a != HookAction::RoutersOnline)
            .map(|a| (a, rec(a)))
            .collect();
        given.insert(
            HookAction::Prepare(BackupTool::Mariabackup),
            rec(HookAction::Prepare(BackupTool::Mariabackup)),
        );
        let e = HookProfile::new(ProfileKind::Custom, given.clone()).unwrap_err();
        assert_eq!(
            e,
            HookError::MissingCommands {
                missing: vec!["routers_online"]
            }
        );
        given.insert(HookAction::RoutersOnline, rec(HookAction::RoutersOnline));
        let p = HookProfile::new(ProfileKind::Custom, given).unwrap();
        let c = p
            .render(HookAction::RoutersOnline, &site("east", "east"))
            .unwrap();
        assert_eq!(c.argv, argv(&["/opt/record", "routers_online", "east"]));
    }

    #[test]
    fn custom_may_leave_backup_out_until_it_is_used() {
        let rec = |a: HookAction| {
            CommandTemplate::parse(a, &argv(&["/opt/record", a.key()]), None).unwrap()
        };
        let given: BTreeMap<_, _> = KEYED
            .into_iter()
            .chain([HookAction::Prepare(BackupTool::Mariabackup)])
            .filter(|a| !matches!(a, HookAction::Backup(_)))
            .map(|a| (a, rec(a)))
            .collect();
        let p = HookProfile::new(ProfileKind::Custom, given).unwrap();
        let backup = HookAction::Backup(BackupTool::Xtrabackup);
        assert!(!p.has(backup));
        assert!(p.has(HookAction::Prepare(BackupTool::Xtrabackup)));
        let e = p
            .render(backup, &host("east1", "east", "east"))
            .unwrap_err();
        assert_eq!(e, HookError::NoCommand { action: "backup" });
        assert!(e.to_string().contains("add backup = [...]"), "{e}");
        // The tungsten profile has both tools' built-ins.
        let t = HookProfile::tungsten().unwrap();
        assert!(BackupTool::ALL
            .into_iter()
            .all(|tool| t.has(HookAction::Backup(tool))));
    }

    #[test]
    fn templates_refuse_unknown_and_unavailable_placeholders() {
        let parse = |a, s: &str| CommandTemplate::parse(a, &argv(&["x", s]), None);
        assert!(matches!(
            parse(HookAction::DatabaseStop, "{port}"),
            Err(HookError::UnknownPlaceholder { name, .. }) if name == "port"
        ));
        assert!(matches!(
            parse(HookAction::PolicyMaintenance, "--dir={staging}"),
            Err(HookError::NotAvailable {
                placeholder: Placeholder::Staging,
                action: "policy_maintenance",
                ..
            })
        ));
        assert!(matches!(
            parse(HookAction::DatabaseStop, "{host"),
            Err(HookError::Unclosed { .. })
        ));
        assert!(matches!(
            parse(HookAction::DatabaseStop, "a}b"),
            Err(HookError::StrayBrace { .. })
        ));
        assert!(matches!(
            CommandTemplate::parse(HookAction::DatabaseStop, &[], None),
            Err(HookError::EmptyCommand { .. })
        ));
        assert!(matches!(
            CommandTemplate::parse(HookAction::DatabaseStop, &argv(&["{host}"]), None),
            Err(HookError::ProgramIsPlaceholder { .. })
        ));
        let t = parse(HookAction::DatabaseStop, "{{literal}}-{host}").unwrap();
        let c = t.render(&host("east1", "east", "east"), false).unwrap();
        assert_eq!(c.argv, argv(&["x", "{literal}-east1"]));
    }

    #[test]
    fn values_cannot_smuggle_anything() {
        let p = HookProfile::tungsten().unwrap();
        for bad in [
            "east; rm -rf /",
            "east\nrouter * offline",
            "-x",
            "$(id)",
            "",
            "a b",
        ] {
            let e = p
                .render(
                    HookAction::ReplicatorOffline,
                    &host("east1", "east", bad.to_owned().leak()),
                )
                .unwrap_err();
            assert!(matches!(e, HookError::UnsafeValue { .. }), "{bad:?}: {e}");
        }
        let mut ctx = host("east1", "east", "east");
        for bad in [
            "relative/dir",
            "/a/../etc",
            "/a b",
            "/a;b",
            "/a\nb",
            "/$HOME",
        ] {
            ctx.staging = Some(bad.to_owned().leak());
            let e = p
                .render(HookAction::Prepare(BackupTool::Xtrabackup), &ctx)
                .unwrap_err();
            assert!(matches!(e, HookError::UnsafeValue { .. }), "{bad:?}: {e}");
        }
    }

    #[test]
    fn render_needs_every_value_preview_does_not() {
        let p = HookProfile::tungsten().unwrap();
        let ctx = HookContext {
            site: Some("east"),
            host: Some("east1"),
            ..HookContext::default()
        };
        let a = HookAction::Prepare(BackupTool::Xtrabackup);
        assert!(matches!(
            p.render(a, &ctx),
            Err(HookError::MissingValue {
                placeholder: Placeholder::Staging,
                ..
            })
        ));
        assert_eq!(
            p.preview(a, &ctx).unwrap().to_string(),
            "xtrabackup --prepare '--target-dir={staging}'"
        );
    }

    #[test]
    fn actions_from_a_key_and_a_tool() {
        assert_eq!(
            HookAction::from_key_and_tool("replicator_reset", None),
            Some(HookAction::ReplicatorReset)
        );
        assert_eq!(
            HookAction::from_key_and_tool("prepare", Some("mariabackup")),
            Some(HookAction::Prepare(BackupTool::Mariabackup))
        );
        // A tool where none belongs, none where one is needed, and unknown names.
        assert_eq!(
            HookAction::from_key_and_tool("replicator_reset", Some("xtrabackup")),
            None
        );
        assert_eq!(HookAction::from_key_and_tool("prepare", None), None);
        assert_eq!(
            HookAction::from_key_and_tool("backup", Some("xtrabackup")),
            Some(HookAction::Backup(BackupTool::Xtrabackup))
        );
        assert_eq!(HookAction::from_key_and_tool("prepare", Some("tar")), None);
        assert_eq!(HookAction::from_key_and_tool("reboot", None), None);
    }

    #[test]
    fn uses_sees_placeholders_in_arguments_and_stdin() {
        let p = HookProfile::tungsten().unwrap();
        let prep = HookAction::Prepare(BackupTool::Xtrabackup);
        assert!(p.uses(prep, Placeholder::Staging));
        assert!(!p.uses(prep, Placeholder::Datadir));
        assert!(p.uses(HookAction::RoutersOffline, Placeholder::Service));
        assert!(!p.uses(HookAction::DatabaseStop, Placeholder::Datadir));
    }

    #[test]
    fn every_action_has_a_key_and_back() {
        let keys: Vec<_> = HookAction::keys().collect();
        assert_eq!(keys.len(), 12);
        for k in keys {
            let actions = HookAction::for_key(k).unwrap();
            assert!(actions.iter().all(|a| a.key() == k));
        }
        assert!(HookAction::for_key("reboot").is_none());
    }
}
