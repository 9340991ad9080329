//! A tool (feature `tools`): writes a realistic large bundle for benchmarks and load tests.
//! The same [`Params`] always give byte-identical files: a hand-written splitmix64 draws
//! every choice, one stream for the directory and one for the policies.

use std::fmt::{self, Display};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::bundle::{DIRECTORY_FILE, LOCATIONS_FILE, SCHEMA_FILE};

/// The project's schema: a generated bundle validates against the same contract.
const SCHEMA: &str = include_str!("../policies/schema.cedarschema");

/// Scoped policies per `.cedar` file.
const POLICIES_PER_FILE: usize = 5_000;

/// The first scoped policies all name the probe agent (agent 0), so that it has some.
const PROBE_POLICIES: usize = 4;

/// How big a bundle to write. Counts below one (agents, blueprints, sponsors, resources)
/// are raised to one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub agents: usize,
    pub blueprints: usize,
    pub sponsors: usize,
    /// All policies: the baseline (up to ten unscoped ones) and the scoped rest.
    pub policies: usize,
    pub resources: usize,
    pub seed: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params { agents: 1000, blueprints: 20, sponsors: 50, policies: 100, resources: 20, seed: 1 }
    }
}

/// A request worth measuring: an enabled agent that has agent-scoped policies, a resource
/// its blueprint allows, and scopes within its blueprint's ceiling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub agent: String,
    pub resource: String,
    pub scopes: Vec<String>,
    /// Policies scoped to this agent alone (zero when the bundle has only its baseline).
    pub agent_policies: usize,
}

/// What [`write_bundle`] wrote.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Every file, in the order written.
    pub files: Vec<PathBuf>,
    pub policies: usize,
    pub agents: usize,
    pub probe: Probe,
}

/// Writes a bundle into `dir` (created if needed): `schema.cedarschema`, `directory.json`,
/// `locations.json`, `baseline.cedar`, and the scoped policies in `agents-NNNN.cedar`,
/// `blueprints-NNNN.cedar` and `sponsors-NNNN.cedar` (5,000 policies a file).
///
/// Scoped policies name an agent (about 60%), a blueprint (25%) or a sponsor (15%). With
/// fewer than eleven policies, only the first ones of the baseline are written. `dir` must
/// not already hold `.cedar` files, which would mix with the new ones.
pub fn write_bundle(dir: &Path, params: &Params) -> io::Result<Summary> {
    fs::create_dir_all(dir)?;
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        if name.to_string_lossy().ends_with(".cedar") {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: holds `{}`: write a bundle into an empty folder", dir.display(), name.to_string_lossy()),
            ));
        }
    }
    let mut files = Vec::new();

    let path = dir.join(SCHEMA_FILE);
    fs::write(&path, SCHEMA)?;
    files.push(path);

    let directory = Directory::generate(params);
    let path = dir.join(DIRECTORY_FILE);
    let mut w = BufWriter::with_capacity(1 << 16, File::create(&path)?);
    directory.write_json(&mut w, &mut Rng::stream(params.seed, 1))?;
    w.flush()?;
    files.push(path);

    let path = dir.join(LOCATIONS_FILE);
    fs::write(&path, LOCATIONS_JSON)?;
    files.push(path);

    let baseline = params.policies.min(BASELINE.len());
    let path = dir.join("baseline.cedar");
    let mut w = BufWriter::new(File::create(&path)?);
    w.write_all(BASELINE_HEADER.as_bytes())?;
    for policy in &BASELINE[..baseline] {
        write!(w, "\n{policy}\n")?;
    }
    w.flush()?;
    files.push(path);

    let mut rng = Rng::stream(params.seed, 2);
    let mut out = [Chunked::new(dir, "agents"), Chunked::new(dir, "blueprints"), Chunked::new(dir, "sponsors")];
    let mut agent_policies = 0;
    for n in 0..params.policies - baseline {
        let policy = directory.scoped_policy(&mut rng, n);
        if policy.kind == Kind::Agent && policy.target == 0 {
            agent_policies += 1;
        }
        policy.write(out[policy.kind as usize].writer()?, n)?;
    }
    for chunked in out {
        files.extend(chunked.finish()?);
    }

    Ok(Summary {
        files,
        policies: params.policies,
        agents: directory.agents.len(),
        probe: Probe {
            agent: agent_id(0),
            resource: directory.resources[directory.probe_resource()].id.clone(),
            scopes: vec![format!("{}.Read", directory.resources[directory.probe_resource()].scope)],
            agent_policies,
        },
    })
}

/// splitmix64: tiny, fast, and the same numbers on every platform.
struct Rng(u64);

impl Rng {
    /// An independent stream of the seed, so that adding policies leaves the directory alone.
    fn stream(seed: u64, stream: u64) -> Rng {
        let mut rng = Rng(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        rng.next();
        rng
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`, `n` at least one.
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n.max(1) as u128) >> 64) as usize
    }

    /// True with the given chance in percent.
    fn percent(&mut self, chance: usize) -> bool {
        self.below(100) < chance
    }

    /// One item of a non-empty slice.
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// A string quoted for JSON and Cedar (both escape `"`, `\` and control characters alike).
struct Q<'a>(&'a str);

impl Display for Q<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for c in self.0.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                c if c.is_control() => write!(f, "\\u{:04x}", c as u32)?,
                c => write!(f, "{c}")?,
            }
        }
        f.write_str("\"")
    }
}

/// A list of strings: a JSON array, or a Cedar set literal.
struct List<'a, S>(&'a [S]);

impl<S: AsRef<str>> Display for List<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            Q(s.as_ref()).fmt(f)?;
        }
        f.write_str("]")
    }
}

/// A JSON object of string tags.
struct Tags<'a>(&'a [(&'static str, &'a str)]);

impl Display for Tags<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}: {}", Q(k), Q(v))?;
        }
        f.write_str("}")
    }
}

const FIRST_NAMES: [&str; 20] = [
    "Alice", "Bob", "Carol", "Dan", "Erin", "Frank", "Gina", "Hiro", "Ivan", "Julia", "Kofi", "Lena", "Marco", "Nadia",
    "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara",
];
const LAST_NAMES: [&str; 20] = [
    "Dubois",
    "Martin",
    "Nguyen",
    "Okafor",
    "Walsh",
    "Lindqvist",
    "Rossi",
    "Tanaka",
    "Petrov",
    "Garcia",
    "Mensah",
    "Schmidt",
    "Silva",
    "Kowalski",
    "Haddad",
    "Sharma",
    "Murphy",
    "Lopez",
    "Berg",
    "Ito",
];
const DEPARTMENTS: [&str; 10] = [
    "Finance",
    "Engineering",
    "Customer Support",
    "Sales",
    "Marketing",
    "HR",
    "Legal",
    "Operations",
    "Security",
    "Research",
];
const PUBLISHERS: [&str; 7] =
    ["Contoso", "Contoso Finance", "Contoso Engineering", "Fabrikam", "Northwind", "Tailspin", "Woodgrove"];
const PURPOSES: [&str; 12] = [
    "Mail triage",
    "Ledger reconciliation",
    "Customer support assistant",
    "Code review bot",
    "Data pipeline operator",
    "HR helpdesk",
    "Sales outreach",
    "Research assistant",
    "IT helpdesk",
    "Invoice processing",
    "Security triage",
    "Meeting scheduler",
];
/// (id, name) of the first resources; later ones add a number.
const RESOURCES: [(&str, &str); 20] = [
    ("graph", "Graph API"),
    ("ledger", "General ledger API"),
    ("payroll", "Payroll API"),
    ("tickets", "Ticketing API"),
    ("crm", "CRM API"),
    ("code", "Source code host"),
    ("warehouse", "Data warehouse"),
    ("billing", "Billing API"),
    ("search", "Enterprise search"),
    ("storage", "Object storage"),
    ("vault", "Secrets vault"),
    ("analytics", "Analytics API"),
    ("inventory", "Inventory API"),
    ("orders", "Orders API"),
    ("docs", "Document store"),
    ("calendar", "Calendar API"),
    ("chat", "Chat API"),
    ("identity", "Identity API"),
    ("monitoring", "Monitoring API"),
    ("hr", "HR records API"),
];
/// (framework, the channel its agents usually come through).
const FRAMEWORKS: [(&str, &str); 7] = [
    ("langchain", "agent365-sdk"),
    ("semantic-kernel", "azure-ai-foundry"),
    ("openai-agents", "agent365-sdk"),
    ("claude-agent-sdk", "github-actions"),
    ("bedrock", "aws-bedrock-agentcore"),
    ("copilot-studio", "copilot-studio"),
    ("foundry", "azure-ai-foundry"),
];

const LOCATIONS_JSON: &str = r#"{
  "corp-network": ["10.0.0.0/8", "2001:db8::/32"],
  "azure-egress": ["20.190.128.0/18", "40.126.0.0/18"],
  "build-farm": ["10.42.0.0/16"],
  "branch-offices": ["172.16.0.0/12", "192.168.0.0/16"],
  "partner-vpn": ["198.51.100.0/24"]
}
"#;
const LOCATION_NAMES: [&str; 5] = ["corp-network", "azure-egress", "build-farm", "branch-offices", "partner-vpn"];
const FLOWS: [&str; 3] = ["app_only", "on_behalf_of", "agent_user"];
const BLOCKED_NETWORKS: [&str; 3] = ["203.0.113.0/24", "192.0.2.0/24", "100.64.0.0/10"];

const BASELINE_HEADER: &str = "// Generated baseline: unscoped policies every request meets.\n";

/// The unscoped baseline, most important first: a bundle with fewer policies keeps a prefix.
const BASELINE: [&str; 10] = [
    r#"@id("allow-within-blueprint")
@reason("the resource is one of the agent's blueprint resources")
permit (principal, action == Action::"request_token", resource)
when { resource in principal.blueprint.allowed_resources };"#,
    r#"@id("gateway-read-within-blueprint")
@reason("read-only calls to one of the agent's blueprint resources")
permit (principal, action == Action::"call_api", resource)
when { resource in principal.blueprint.allowed_resources && ["GET", "HEAD"].contains(context.method) };"#,
    r#"@id("blueprint-resource-ceiling")
@reason("the resource is not one of the agent's blueprint resources")
forbid (principal, action, resource)
unless { resource in principal.blueprint.allowed_resources };"#,
    r#"@id("blueprint-scope-ceiling")
@reason("the requested scopes exceed the blueprint's scope ceiling")
forbid (principal, action == Action::"request_token", resource)
unless { principal.blueprint.allowed_scopes.containsAll(context.scopes) };"#,
    r#"@id("block-high-risk-agents")
@reason("the agent's risk level is high")
forbid (principal, action, resource)
when { context.agent_risk == "high" };"#,
    r#"@id("high-sensitivity-from-named-locations")
@reason("high-sensitivity resources are reachable only from a named location")
forbid (principal, action, resource)
when { resource.sensitivity == "high" }
unless { context.locations.containsAny(["corp-network", "azure-egress"]) };"#,
    r#"@id("confidential-data-needs-clearance")
@reason("the resource holds confidential data and the agent has no confidential clearance")
forbid (principal, action, resource)
when { resource.hasTag("data_classification") && resource.getTag("data_classification") == "confidential" }
unless { principal.hasTag("data_clearance") && principal.getTag("data_clearance") == "confidential" };"#,
    r#"@id("prod-resources-need-prod-agents")
@reason("only agents tagged env=prod may reach production resources")
forbid (principal, action, resource)
when { resource.hasTag("env") && resource.getTag("env") == "prod" }
unless { principal.hasTag("env") && principal.getTag("env") == "prod" };"#,
    r#"@id("block-medium-risk-agents")
@state("report-only")
@reason("the agent's risk level is medium")
forbid (principal, action, resource)
when { context.agent_risk == "medium" };"#,
    r#"@id("block-agent-users")
@state("off")
@reason("agent users are blocked")
forbid (principal, action, resource)
when { context.flow == "agent_user" };"#,
];

fn agent_id(i: usize) -> String {
    format!("ag-{i:06}")
}

fn blueprint_id(i: usize) -> String {
    format!("bp-{i:04}")
}

fn sponsor_id(i: usize) -> String {
    format!("s-{i:05}")
}

fn user_id(i: usize) -> String {
    format!("u-{i:05}")
}

fn person(rng: &mut Rng) -> String {
    format!("{} {}", rng.pick(&FIRST_NAMES), rng.pick(&LAST_NAMES))
}

struct Resource {
    id: String,
    name: String,
    /// The prefix of its scopes: `Ledger` for `Ledger.Read`.
    scope: String,
}

struct Blueprint {
    purpose: &'static str,
    /// Indexes into the resources, the first one first drawn.
    resources: Vec<usize>,
    scopes: Vec<String>,
}

/// What the policies need to know of the directory; the rest is drawn as it is written.
struct Directory {
    users: usize,
    sponsors: usize,
    resources: Vec<Resource>,
    blueprints: Vec<Blueprint>,
    /// The blueprint of each agent.
    agents: Vec<u32>,
}

impl Directory {
    fn generate(params: &Params) -> Directory {
        let mut rng = Rng::stream(params.seed, 0);
        let resources: Vec<Resource> = (0..params.resources.max(1))
            .map(|i| {
                let (base, name) = RESOURCES[i % RESOURCES.len()];
                let round = i / RESOURCES.len();
                let mut scope: String = base[..1].to_ascii_uppercase() + &base[1..];
                if round == 0 {
                    Resource { id: base.into(), name: name.into(), scope }
                } else {
                    scope.push_str(&round.to_string());
                    Resource { id: format!("{base}-{round}"), name: format!("{name} {round}"), scope }
                }
            })
            .collect();
        let blueprints = (0..params.blueprints.max(1))
            .map(|_| {
                let wanted = 1 + rng.below(3).min(resources.len() - 1);
                let mut picked: Vec<usize> = Vec::with_capacity(wanted);
                while picked.len() < wanted {
                    let r = rng.below(resources.len());
                    if !picked.contains(&r) {
                        picked.push(r);
                    }
                }
                let mut scopes = Vec::new();
                for &r in &picked {
                    let prefix = &resources[r].scope;
                    scopes.push(format!("{prefix}.Read"));
                    if rng.percent(50) {
                        scopes.push(format!("{prefix}.Write"));
                    }
                    if rng.percent(10) {
                        scopes.push(format!("{prefix}.Admin"));
                    }
                }
                Blueprint { purpose: rng.pick(&PURPOSES), resources: picked, scopes }
            })
            .collect::<Vec<_>>();
        let agents = (0..params.agents.max(1))
            // Agent 0, the probe, belongs to blueprint 0.
            .map(|i| if i == 0 { 0 } else { rng.below(blueprints.len()) as u32 })
            .collect();
        Directory {
            users: (params.agents / 20).max(10),
            sponsors: params.sponsors.max(1),
            resources,
            blueprints,
            agents,
        }
    }

    /// The resource of the probe request: the first of blueprint 0.
    fn probe_resource(&self) -> usize {
        self.blueprints.first().and_then(|b| b.resources.first()).copied().unwrap_or(0)
    }

    /// Writes `directory.json`, one object a line like the sample bundle. The blueprint,
    /// sponsor and probe choices are already made; `rng` draws the rest.
    fn write_json(&self, w: &mut impl Write, rng: &mut Rng) -> io::Result<()> {
        writeln!(w, "{{\n  \"users\": [")?;
        for i in 0..self.users {
            let comma = if i + 1 < self.users { "," } else { "" };
            writeln!(w, "    {{\"id\": {}, \"name\": {}}}{comma}", Q(&user_id(i)), Q(&person(rng)))?;
        }
        writeln!(w, "  ],\n  \"sponsors\": [")?;
        for i in 0..self.sponsors {
            let comma = if i + 1 < self.sponsors { "," } else { "" };
            // The probe's sponsor is active; about 2% of the others are not.
            let active = i == 0 || !rng.percent(2);
            let department = rng.pick(&DEPARTMENTS);
            let cost_center = (1000 + rng.below(9000)).to_string();
            writeln!(
                w,
                "    {{\"id\": {}, \"name\": {}, \"active\": {active}, \"department\": {}, \"tags\": {}}}{comma}",
                Q(&sponsor_id(i)),
                Q(&person(rng)),
                Q(department),
                Tags(&[("cost_center", &cost_center)]),
            )?;
        }
        writeln!(w, "  ],\n  \"blueprints\": [")?;
        for (i, b) in self.blueprints.iter().enumerate() {
            let comma = if i + 1 < self.blueprints.len() { "," } else { "" };
            let enabled = i == 0 || !rng.percent(1);
            let tier = if rng.percent(30) { "regulated" } else { "standard" };
            let allowed: Vec<&str> = b.resources.iter().map(|&r| self.resources[r].id.as_str()).collect();
            writeln!(
                w,
                "    {{\"id\": {}, \"name\": {}, \"enabled\": {enabled}, \"publisher\": {}, \"allowed_scopes\": {}, \
                 \"allowed_resources\": {}, \"tags\": {}}}{comma}",
                Q(&blueprint_id(i)),
                Q(&format!("{} {i}", b.purpose)),
                Q(rng.pick(&PUBLISHERS)),
                List(&b.scopes),
                List(&allowed),
                Tags(&[("tier", tier)]),
            )?;
        }
        writeln!(w, "  ],\n  \"agents\": [")?;
        for (i, &bp) in self.agents.iter().enumerate() {
            let comma = if i + 1 < self.agents.len() { "," } else { "" };
            let probe = i == 0;
            let sponsor = if probe { 0 } else { rng.below(self.sponsors) };
            let mut owners = vec![user_id(rng.below(self.users))];
            if rng.percent(20) {
                let second = user_id(rng.below(self.users));
                if second != owners[0] {
                    owners.push(second);
                }
            }
            let enabled = probe || !rng.percent(2);
            let risk = match rng.below(1000) {
                _ if probe => "none",
                0..940 => "none",
                940..980 => "low",
                980..995 => "medium",
                _ => "high",
            };
            let (framework, channel) = rng.pick(&FRAMEWORKS);
            let env = if probe || rng.percent(80) { "prod" } else { "dev" };
            let clearance = match rng.below(100) {
                _ if probe => Some("confidential"),
                0..25 => Some("confidential"),
                25..65 => Some("internal"),
                _ => None,
            };
            let mut tags = vec![("env", env)];
            if let Some(c) = clearance {
                tags.push(("data_clearance", c));
            }
            if rng.percent(30) {
                tags.push(("region", if rng.percent(50) { "eu" } else { "us" }));
            }
            let blueprint = &self.blueprints[bp as usize];
            writeln!(
                w,
                "    {{\"id\": {}, \"name\": {}, \"blueprint\": {}, \"sponsor\": {}, \"owners\": {}, \
                 \"enabled\": {enabled}, \"risk\": {}, \"framework\": {}, \"channel\": {}, \"tags\": {}}}{comma}",
                Q(&agent_id(i)),
                Q(&format!("{} {i:06}", blueprint.purpose)),
                Q(&blueprint_id(bp as usize)),
                Q(&sponsor_id(sponsor)),
                List(&owners),
                Q(risk),
                Q(framework),
                Q(channel),
                Tags(&tags),
            )?;
        }
        writeln!(w, "  ],\n  \"resources\": [")?;
        for (i, r) in self.resources.iter().enumerate() {
            let comma = if i + 1 < self.resources.len() { "," } else { "" };
            let sensitivity = match rng.below(100) {
                0..30 => "low",
                30..75 => "medium",
                _ => "high",
            };
            let mut tags = vec![("env", if rng.percent(90) { "prod" } else { "dev" })];
            if sensitivity == "high" && rng.percent(60) {
                tags.push(("data_classification", "confidential"));
            } else if rng.percent(20) {
                tags.push(("data_classification", "internal"));
            }
            let audiences = [format!("https://{}.contoso.example", r.id), format!("api://{}", r.id)];
            writeln!(
                w,
                "    {{\"id\": {}, \"name\": {}, \"audiences\": {}, \"sensitivity\": {}, \"tags\": {}}}{comma}",
                Q(&r.id),
                Q(&r.name),
                List(&audiences),
                Q(sensitivity),
                Tags(&tags),
            )?;
        }
        writeln!(w, "  ]\n}}")
    }

    /// The `n`th scoped policy.
    fn scoped_policy(&self, rng: &mut Rng, n: usize) -> Scoped {
        let probe = n < PROBE_POLICIES;
        let (kind, target) = if probe {
            (Kind::Agent, 0)
        } else {
            match rng.below(100) {
                0..60 => (Kind::Agent, rng.below(self.agents.len())),
                60..85 => (Kind::Blueprint, rng.below(self.blueprints.len())),
                _ => (Kind::Sponsor, rng.below(self.sponsors)),
            }
        };
        // The resources a policy about this principal would most likely name.
        let home: Option<&[usize]> = match kind {
            Kind::Agent => self.agents.get(target).map(|&b| &self.blueprints[b as usize].resources[..]),
            Kind::Blueprint => Some(&self.blueprints[target].resources[..]),
            Kind::Sponsor => None,
        };
        let draw_resource = |rng: &mut Rng| match home {
            _ if probe => self.probe_resource(),
            Some(rs) => rng.pick(rs),
            None => rng.below(self.resources.len()),
        };
        // The probe's policies are about tokens, so that its request meets them.
        let action = match (probe, rng.below(100)) {
            (true, 0..50) => Act::Token,
            (true, _) => Act::Both,
            (false, 0..45) => Act::Token,
            (false, 45..70) => Act::Api,
            (false, _) => Act::Both,
        };
        let resource = rng.percent(40).then(|| draw_resource(rng));
        let forbid = rng.percent(70);
        let scopes_of = resource.unwrap_or_else(|| draw_resource(rng));
        let condition = self.condition(rng, forbid, action, &self.resources[scopes_of].scope);
        let state = match rng.below(100) {
            _ if probe => "",
            0..3 => "report-only",
            3..4 => "off",
            _ => "",
        };
        Scoped {
            kind,
            target,
            forbid,
            action,
            resource: resource.map(|r| self.resources[r].id.clone()),
            state,
            condition,
        }
    }

    fn condition(&self, rng: &mut Rng, forbid: bool, action: Act, scope: &str) -> Condition {
        let candidates: Vec<Template> = Template::ALL
            .iter()
            .filter(|t| t.forbid() == forbid && (t.applies() == Act::Both || t.applies() == action))
            .copied()
            .collect();
        // INVARIANT: every (effect, action) pair has templates that apply to both actions.
        let template = candidates.get(rng.below(candidates.len())).copied().unwrap_or(Template::Weekends);
        let (read, write, admin) = (format!("{scope}.Read"), format!("{scope}.Write"), format!("{scope}.Admin"));
        let loc = rng.pick(&LOCATION_NAMES);
        let (from, to) = (5 + rng.below(5), 17 + rng.below(6));
        let (year, month) = (2027 + rng.below(2), 1 + rng.below(12));
        let (slug, clause, what) = match template {
            Template::BusinessHours => (
                "business-hours",
                format!("unless {{ context.hour >= {from} && context.hour < {to} }}"),
                format!("is blocked outside {from:02}:00-{to:02}:00 UTC"),
            ),
            Template::Weekends => (
                "no-weekends",
                r#"when { ["sat", "sun"].contains(context.weekday) }"#.into(),
                "is blocked on weekends".into(),
            ),
            Template::NamedLocation => (
                "named-location-only",
                format!("unless {{ context.locations.contains({}) }}", Q(loc)),
                format!("is blocked outside the {loc} location"),
            ),
            Template::AgentRisk => (
                "risk-free-only",
                r#"when { ["medium", "high"].contains(context.agent_risk) }"#.into(),
                "is blocked while the agent's risk is medium or high".into(),
            ),
            Template::SigninRisk => (
                "no-risky-signins",
                r#"when { context.signin_risk == "high" }"#.into(),
                "is blocked after a high-risk sign-in".into(),
            ),
            Template::Flow => {
                let flow = rng.pick(&FLOWS);
                ("flow-blocked", format!("when {{ context.flow == {} }}", Q(flow)), format!("is blocked for {flow}"))
            }
            Template::ProdOnly => (
                "prod-agents-only",
                r#"unless { principal.hasTag("env") && principal.getTag("env") == "prod" }"#.into(),
                "is allowed only to agents tagged env=prod".into(),
            ),
            Template::HighSensitivityFromCorp => (
                "high-sensitivity-from-corp",
                r#"when { resource.sensitivity == "high" } unless { context.locations.contains("corp-network") }"#
                    .into(),
                "reaches high-sensitivity resources only from corp-network".into(),
            ),
            Template::Expires => (
                "access-expires",
                format!(r#"when {{ context.time >= datetime("{year}-{month:02}-01T00:00:00Z") }}"#),
                format!("has no access from {year}-{month:02}-01"),
            ),
            Template::BlockedNetwork => {
                let cidr = rng.pick(&BLOCKED_NETWORKS);
                (
                    "blocked-network",
                    format!("when {{ context has client_ip && context.client_ip.isInRange(ip({})) }}", Q(cidr)),
                    format!("is blocked from {cidr}"),
                )
            }
            Template::Clearance => (
                "classified-needs-clearance",
                r#"when { resource.hasTag("data_classification") }
unless { principal.hasTag("data_clearance") && principal.getTag("data_clearance") == "confidential" }"#
                    .into(),
                "needs confidential clearance for classified data".into(),
            ),
            Template::WriteFromCorp => (
                "write-from-corp",
                format!(
                    "when {{ context.scopes.contains({}) }} unless {{ context.locations.contains(\"corp-network\") }}",
                    Q(&write)
                ),
                format!("may ask for {write} only from corp-network"),
            ),
            Template::NoAppOnlyWrites => (
                "no-app-only-writes",
                format!(
                    "when {{ context.flow == \"app_only\" && context.scopes.containsAny({}) }}",
                    List(&[write.as_str(), admin.as_str()])
                ),
                format!("may ask for {write} or {admin} only on behalf of a user"),
            ),
            Template::OboCleanSignin => (
                "obo-clean-signin",
                r#"when { context.flow == "on_behalf_of" && context.signin_risk != "none" }"#.into(),
                "acts on behalf of users only after a clean sign-in".into(),
            ),
            Template::ScopeAllowList => (
                "scope-allow-list",
                format!("unless {{ {}.containsAll(context.scopes) }}", List(&[read.as_str(), write.as_str()])),
                format!("may ask only for {read} and {write}"),
            ),
            Template::ReadOnlyCalls => (
                "read-only-calls",
                r#"when { ["POST", "PUT", "PATCH", "DELETE"].contains(context.method) }"#.into(),
                "may only read".into(),
            ),
            Template::NoAdminPaths => (
                "no-admin-paths",
                r#"when { context.path like "/admin/*" }"#.into(),
                "may not call /admin paths".into(),
            ),
            Template::DeleteFromCorp => (
                "delete-from-corp",
                r#"when { context.method == "DELETE" } unless { context.locations.contains("corp-network") }"#.into(),
                "may delete only from corp-network".into(),
            ),
            Template::LocationHours => (
                "allow-location-hours",
                format!(
                    "when {{ context.locations.contains({}) && context.hour >= {from} && context.hour < {to} }}",
                    Q(loc)
                ),
                format!("is allowed from {loc} between {from:02}:00 and {to:02}:00 UTC"),
            ),
            Template::LowSensitivity => (
                "allow-low-sensitivity",
                r#"when { context.agent_risk == "none" && resource.sensitivity != "high" }"#.into(),
                "is allowed to resources that are not high-sensitivity while risk-free".into(),
            ),
            Template::SameEnv => (
                "allow-same-env",
                r#"when { principal.hasTag("env") && resource.hasTag("env") && principal.getTag("env") == resource.getTag("env") }"#
                    .into(),
                "is allowed to resources of its own env".into(),
            ),
            Template::Temporary => (
                "temporary-access",
                format!(r#"when {{ context.time < datetime("{year}-{month:02}-01T00:00:00Z") }}"#),
                format!("has temporary access until {year}-{month:02}-01"),
            ),
            Template::ListedScopes => (
                "allow-listed-scopes",
                format!("when {{ {}.containsAll(context.scopes) }}", List(&[read.as_str()])),
                format!("may ask for {read}"),
            ),
            Template::Delegated => (
                "allow-delegated",
                r#"when { context.flow == "on_behalf_of" && context has user }"#.into(),
                "is allowed on behalf of a signed-in user".into(),
            ),
            Template::ReadV1 => (
                "allow-read-v1",
                r#"when { ["GET", "HEAD"].contains(context.method) && context.path like "/v1/*" }"#.into(),
                "may read the /v1 API".into(),
            ),
            Template::PostFromBuildFarm => (
                "allow-post-from-build-farm",
                r#"when { context.method == "POST" && context.locations.contains("build-farm") }"#.into(),
                "may post from the build farm".into(),
            ),
        };
        Condition { slug, clause, what }
    }
}

/// The kind of principal a scoped policy names; the index of its output files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Agent = 0,
    Blueprint = 1,
    Sponsor = 2,
}

/// The actions a policy names. `Both` leaves the action open, so its condition may use
/// only the context fields both actions have (strict validation checks each action).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Token,
    Api,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Template {
    BusinessHours,
    Weekends,
    NamedLocation,
    AgentRisk,
    SigninRisk,
    Flow,
    ProdOnly,
    HighSensitivityFromCorp,
    Expires,
    BlockedNetwork,
    Clearance,
    WriteFromCorp,
    NoAppOnlyWrites,
    OboCleanSignin,
    ScopeAllowList,
    ReadOnlyCalls,
    NoAdminPaths,
    DeleteFromCorp,
    LocationHours,
    LowSensitivity,
    SameEnv,
    Temporary,
    ListedScopes,
    Delegated,
    ReadV1,
    PostFromBuildFarm,
}

impl Template {
    const ALL: [Template; 26] = [
        Template::BusinessHours,
        Template::Weekends,
        Template::NamedLocation,
        Template::AgentRisk,
        Template::SigninRisk,
        Template::Flow,
        Template::ProdOnly,
        Template::HighSensitivityFromCorp,
        Template::Expires,
        Template::BlockedNetwork,
        Template::Clearance,
        Template::WriteFromCorp,
        Template::NoAppOnlyWrites,
        Template::OboCleanSignin,
        Template::ScopeAllowList,
        Template::ReadOnlyCalls,
        Template::NoAdminPaths,
        Template::DeleteFromCorp,
        Template::LocationHours,
        Template::LowSensitivity,
        Template::SameEnv,
        Template::Temporary,
        Template::ListedScopes,
        Template::Delegated,
        Template::ReadV1,
        Template::PostFromBuildFarm,
    ];

    fn forbid(self) -> bool {
        !matches!(
            self,
            Template::LocationHours
                | Template::LowSensitivity
                | Template::SameEnv
                | Template::Temporary
                | Template::ListedScopes
                | Template::Delegated
                | Template::ReadV1
                | Template::PostFromBuildFarm
        )
    }

    /// The action whose context the condition reads; `Both` if it reads only shared fields.
    fn applies(self) -> Act {
        match self {
            Template::WriteFromCorp
            | Template::NoAppOnlyWrites
            | Template::OboCleanSignin
            | Template::ScopeAllowList
            | Template::ListedScopes
            | Template::Delegated => Act::Token,
            Template::ReadOnlyCalls
            | Template::NoAdminPaths
            | Template::DeleteFromCorp
            | Template::ReadV1
            | Template::PostFromBuildFarm => Act::Api,
            _ => Act::Both,
        }
    }
}

struct Condition {
    slug: &'static str,
    /// `when { … }` and/or `unless { … }`.
    clause: String,
    /// What the policy does to its principal, for `@reason`.
    what: String,
}

/// One scoped policy, drawn and ready to write.
struct Scoped {
    kind: Kind,
    target: usize,
    forbid: bool,
    action: Act,
    resource: Option<String>,
    state: &'static str,
    condition: Condition,
}

impl Scoped {
    fn write(&self, w: &mut impl Write, n: usize) -> io::Result<()> {
        let (principal, who) = match self.kind {
            Kind::Agent => {
                let id = agent_id(self.target);
                (format!("principal == Agent::{}", Q(&id)), format!("agent {id}"))
            }
            Kind::Blueprint => {
                let id = blueprint_id(self.target);
                (format!("principal in Blueprint::{}", Q(&id)), format!("agents of blueprint {id}"))
            }
            Kind::Sponsor => {
                let id = sponsor_id(self.target);
                (format!("principal in Sponsor::{}", Q(&id)), format!("agents sponsored by {id}"))
            }
        };
        let (action, doing) = match self.action {
            Act::Token => (r#"action == Action::"request_token""#, " (tokens)"),
            Act::Api => (r#"action == Action::"call_api""#, " (API calls)"),
            Act::Both => ("action", ""),
        };
        let (resource, on) = match &self.resource {
            Some(id) => (format!("resource == Resource::{}", Q(id)), format!(" on {id}")),
            None => ("resource".to_string(), String::new()),
        };
        let Condition { slug, clause, what } = &self.condition;
        writeln!(w, "\n@id(\"{slug}-{n:06}\")")?;
        if !self.state.is_empty() {
            writeln!(w, "@state({})", Q(self.state))?;
        }
        let reason = format!("{who}{on}{doing}: {what}");
        writeln!(w, "@reason({})", Q(&reason))?;
        let effect = if self.forbid { "forbid" } else { "permit" };
        writeln!(w, "{effect} ({principal}, {action}, {resource})\n{clause};")
    }
}

/// Scoped policies of one kind, rotated over numbered files.
struct Chunked {
    dir: PathBuf,
    prefix: &'static str,
    current: Option<BufWriter<File>>,
    in_current: usize,
    files: Vec<PathBuf>,
}

impl Chunked {
    fn new(dir: &Path, prefix: &'static str) -> Chunked {
        Chunked { dir: dir.to_path_buf(), prefix, current: None, in_current: 0, files: Vec::new() }
    }

    /// The writer for the next policy, opening the next file when the current one is full.
    fn writer(&mut self) -> io::Result<&mut BufWriter<File>> {
        if self.in_current == POLICIES_PER_FILE
            && let Some(mut full) = self.current.take()
        {
            full.flush()?;
        }
        let w = match self.current.take() {
            Some(w) => w,
            None => {
                let path = self.dir.join(format!("{}-{:04}.cedar", self.prefix, self.files.len()));
                let mut w = BufWriter::with_capacity(1 << 16, File::create(&path)?);
                writeln!(w, "// Generated: policies scoped to one {}.", self.prefix.trim_end_matches('s'))?;
                self.files.push(path);
                self.in_current = 0;
                w
            }
        };
        self.in_current += 1;
        Ok(self.current.insert(w))
    }

    fn finish(mut self) -> io::Result<Vec<PathBuf>> {
        if let Some(mut w) = self.current.take() {
            w.flush()?;
        }
        Ok(self.files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Verdict, evaluate};
    use crate::request::RawRequest;
    use crate::signals::Overlay;
    use crate::snapshot::Snapshot;
    use chrono::{TimeZone, Utc};

    fn small(seed: u64, policies: usize) -> Params {
        Params { agents: 300, blueprints: 12, sponsors: 20, policies, resources: 25, seed }
    }

    fn request(agent: &str, resource: &str, action: &str, scopes: &[String]) -> crate::request::Request {
        let mut raw = RawRequest {
            agent: Some(agent.into()),
            resource: Some(resource.into()),
            action: Some(action.into()),
            client_ip: Some("10.1.2.3".into()),
            ..RawRequest::default()
        };
        if action == "call_api" {
            raw.method = Some("GET".into());
            raw.path = Some("/v1/items".into());
        } else {
            raw.scopes = scopes.to_vec();
        }
        raw.validate(Utc.with_ymd_and_hms(2026, 11, 25, 10, 0, 0).unwrap()).unwrap()
    }

    #[test]
    fn generated_bundles_load_under_strict_validation_and_evaluate_without_errors() {
        for (seed, policies) in [(7, 600), (8, 3), (9, 10), (10, 11)] {
            let dir = tempfile::tempdir().unwrap();
            let summary = write_bundle(dir.path(), &small(seed, policies)).unwrap();
            let snap = match Snapshot::load(dir.path()) {
                Ok(s) => s,
                Err(e) => panic!("seed {seed}, {policies} policies:\n{e}"),
            };
            assert!(snap.warnings().is_empty(), "{:?}", snap.warnings());
            assert_eq!(snap.policies().len(), policies);
            assert_eq!((summary.policies, summary.agents), (policies, 300));
            assert_eq!(snap.counts().agents, 300);
            assert!(snap.unreachable().is_empty(), "{:?}", snap.unreachable());
            assert!(summary.probe.agent_policies >= policies.saturating_sub(BASELINE.len()).min(PROBE_POLICIES));

            // No generated condition errors at run time (a missing tag, a wrong type).
            let live = Overlay::new();
            let probe = &summary.probe;
            let d = evaluate(&snap, &live, &request(&probe.agent, &probe.resource, "request_token", &probe.scopes));
            assert!(d.errors.is_empty(), "{:?}", d.errors);
            if policies >= 3 {
                assert!(d.reasons.iter().all(|r| r.policy.is_some()), "{:?}", d.reasons);
            }
            for agent in snap.agents().take(100) {
                for resource in ["graph", "ledger", "hr"] {
                    for action in ["request_token", "call_api"] {
                        let d = evaluate(&snap, &live, &request(agent.id(), resource, action, &["Graph.Read".into()]));
                        assert!(d.errors.is_empty(), "{}: {:?}", agent.id(), d.errors);
                    }
                }
            }
        }
    }

    #[test]
    fn generated_policies_nest_far_below_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let summary = write_bundle(dir.path(), &small(11, 2000)).unwrap();
        let deepest = summary
            .files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "cedar"))
            .map(|f| crate::nesting::policy_depth(&fs::read_to_string(f).unwrap()))
            .max();
        assert!(deepest.is_some_and(|d| d <= crate::nesting::MAX_NESTING / 16), "{deepest:?}");
    }

    #[test]
    fn the_probe_request_is_allowed_by_the_baseline() {
        let dir = tempfile::tempdir().unwrap();
        let summary = write_bundle(dir.path(), &small(3, BASELINE.len())).unwrap();
        let snap = Snapshot::load(dir.path()).unwrap();
        let probe = &summary.probe;
        let d =
            evaluate(&snap, &Overlay::new(), &request(&probe.agent, &probe.resource, "request_token", &probe.scopes));
        assert_eq!(d.decision, Verdict::Allow, "{:?}", d.reasons);
    }

    #[test]
    fn scoped_policies_follow_the_mix() {
        let dir = tempfile::tempdir().unwrap();
        let summary = write_bundle(dir.path(), &small(5, 4010)).unwrap();
        let mut counts = [0usize; 3];
        for f in summary.files.iter().filter(|f| f.extension().is_some_and(|e| e == "cedar")) {
            let text = fs::read_to_string(f).unwrap();
            for (i, needle) in
                ["principal == Agent::", "principal in Blueprint::", "principal in Sponsor::"].iter().enumerate()
            {
                counts[i] += text.matches(needle).count();
            }
        }
        assert_eq!(counts.iter().sum::<usize>(), 4000);
        assert!((2200..2600).contains(&counts[0]), "{counts:?}");
        assert!((850..1150).contains(&counts[1]), "{counts:?}");
        assert!((450..750).contains(&counts[2]), "{counts:?}");
        let names: Vec<String> =
            summary.files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert!(names.contains(&"agents-0000.cedar".to_string()), "{names:?}");
    }

    #[test]
    fn the_same_seed_writes_the_same_bytes() {
        let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let fa = write_bundle(a.path(), &small(42, 300)).unwrap().files;
        let fb = write_bundle(b.path(), &small(42, 300)).unwrap().files;
        write_bundle(c.path(), &small(43, 300)).unwrap();
        let names = |fs: &[PathBuf]| fs.iter().map(|f| f.file_name().unwrap().to_owned()).collect::<Vec<_>>();
        assert_eq!(names(&fa), names(&fb));
        for (x, y) in fa.iter().zip(&fb) {
            assert_eq!(fs::read(x).unwrap(), fs::read(y).unwrap(), "{}", x.display());
        }
        let differ = |name: &str| fs::read(a.path().join(name)).unwrap() != fs::read(c.path().join(name)).unwrap();
        assert!(differ(DIRECTORY_FILE));
        assert!(differ("agents-0000.cedar"));
        assert!(!differ(SCHEMA_FILE));
    }

    #[test]
    fn a_folder_with_policies_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("old.cedar"), "").unwrap();
        let err = write_bundle(dir.path(), &Params::default()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    }
}
