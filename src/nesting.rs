//! How deeply Cedar text may nest, checked before Cedar reads it. Cedar's parser, the drop of
//! the trees it builds and our own walks over conditions recurse once per level, and a thread
//! that runs out of stack aborts the whole process: no error, no old revision kept.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

/// How deeply a policy expression or a schema type may nest. In a policy each bracket counts
/// as a level, and so does each operator of a chain (`a || b || c` is two levels, as in the
/// tree Cedar builds); in a schema each bracket (`<` too), counted through common types.
pub const MAX_NESTING: usize = 256;

/// How many entity types, and how many actions, a schema may declare: Cedar walks their
/// hierarchies recursively (and in quadratic time and space).
pub const MAX_SCHEMA_NAMES: usize = 1000;

/// Text that nests too deeply, or a schema too large to walk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NestingError {
    #[error(
        "nested too deeply: expressions may nest at most {MAX_NESTING} levels (each bracket and each chained operator counts)"
    )]
    Expression { offset: usize },
    #[error("nested too deeply: types may nest at most {MAX_NESTING} levels (each bracket counts)")]
    Type { offset: usize },
    #[error("{what} is nested too deeply: with the common types it uses, more than {MAX_NESTING} levels")]
    ThroughCommonTypes { what: String, offset: Option<usize> },
    #[error("common type `{name}` is defined in terms of itself")]
    Cycle { name: String, offset: Option<usize> },
    #[error("too many {what}: {count} (at most {MAX_SCHEMA_NAMES})")]
    TooMany { what: &'static str, count: usize },
}

impl NestingError {
    /// The byte offset in the text the error is about, when there is one.
    pub fn offset(&self) -> Option<usize> {
        match self {
            NestingError::Expression { offset } | NestingError::Type { offset } => Some(*offset),
            NestingError::ThroughCommonTypes { offset, .. } | NestingError::Cycle { offset, .. } => *offset,
            NestingError::TooMany { .. } => None,
        }
    }
}

/// Checks a `.cedar` file: an upper bound of how deeply its expressions nest.
pub fn check_policies(src: &str) -> Result<(), NestingError> {
    match scan(src, Syntax::Policy, MAX_NESTING) {
        Scan { exceeded_at: Some(offset), .. } => Err(NestingError::Expression { offset }),
        _ => Ok(()),
    }
}

/// Checks the text of a schema: how deeply its types nest, brackets counted.
pub fn check_schema_text(src: &str) -> Result<(), NestingError> {
    if let Scan { exceeded_at: Some(offset), .. } = scan(src, Syntax::Schema, MAX_NESTING) {
        return Err(NestingError::Type { offset });
    }
    // Cedar resolves common types in time that grows faster than their number (20,000 take
    // half a minute): count their declarations (`type Name =`) before it parses any.
    let mut tokens = Tokens::new(src, Syntax::Schema).map(|(_, t)| t).peekable();
    let mut common = 0;
    while let Some(token) = tokens.next() {
        if token == Token::Ident("type") && matches!(tokens.peek(), Some(Token::Ident(_))) {
            common += 1;
        }
    }
    if common > MAX_SCHEMA_NAMES {
        return Err(NestingError::TooMany { what: "common types", count: common });
    }
    Ok(())
}

/// The nesting bound of a `.cedar` file (what `check_policies` holds against the limit).
pub fn policy_depth(src: &str) -> usize {
    scan(src, Syntax::Policy, usize::MAX).deepest
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Syntax {
    Policy,
    Schema,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    /// `(`, `[`, `{` (and `<` in a schema).
    Open(u8),
    Close,
    /// `,` or `;`: what came before at this level is a finished sibling.
    Separator,
    /// A binary or unary operator of a policy, by precedence tier; `-` is told apart later.
    Operator(usize),
    Minus,
    Ident(&'a str),
    /// A number or a string.
    Literal,
    Other,
}

/// Cedar's precedence tiers, loosest first: a path from the root of an expression to a leaf
/// crosses at most one chain of each tier between two brackets.
const OR: usize = 0;
const AND: usize = 1;
const RELATION: usize = 2;
const ADD: usize = 3;
const MULTIPLY: usize = 4;
const UNARY: usize = 5;
const MEMBER: usize = 6;
const TIERS: usize = 7;

/// The tokens of Cedar text that matter for nesting, with their byte offsets. Strings (with
/// their escapes) and `//` comments are skipped, so brackets inside them do not count.
struct Tokens<'a> {
    src: &'a str,
    at: usize,
    syntax: Syntax,
}

impl<'a> Tokens<'a> {
    fn new(src: &'a str, syntax: Syntax) -> Self {
        Tokens { src, at: 0, syntax }
    }

    fn ident(&mut self, start: usize) -> Token<'a> {
        let b = self.src.as_bytes();
        while b.get(self.at).is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_') {
            self.at += 1;
        }
        // INVARIANT: an identifier is ASCII, so both ends are character boundaries.
        Token::Ident(self.src.get(start..self.at).unwrap_or(""))
    }
}

impl<'a> Iterator for Tokens<'a> {
    type Item = (usize, Token<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let b = self.src.as_bytes();
        loop {
            let start = self.at;
            let c = *b.get(start)?;
            let next = b.get(start + 1).copied();
            self.at += 1;
            let policy = self.syntax == Syntax::Policy;
            let token = match c {
                _ if c.is_ascii_whitespace() => continue,
                b'/' if next == Some(b'/') => {
                    self.at = b[start..].iter().position(|&c| c == b'\n').map_or(b.len(), |i| start + i + 1);
                    continue;
                }
                b'"' => {
                    while let Some(&c) = b.get(self.at) {
                        self.at += if c == b'\\' { 2 } else { 1 };
                        if c == b'"' {
                            break;
                        }
                    }
                    self.at = self.at.min(b.len());
                    Token::Literal
                }
                b'(' | b'[' | b'{' => Token::Open(c),
                b')' | b']' | b'}' => Token::Close,
                b'<' if !policy => Token::Open(c),
                b'>' if !policy => Token::Close,
                b',' | b';' => Token::Separator,
                b':' if next == Some(b':') => {
                    self.at += 1;
                    Token::Other
                }
                _ if c.is_ascii_alphabetic() || c == b'_' => self.ident(start),
                _ if c.is_ascii_digit() => {
                    while b.get(self.at).is_some_and(u8::is_ascii_alphanumeric) {
                        self.at += 1;
                    }
                    Token::Literal
                }
                _ if !policy => Token::Other,
                b'&' if next == Some(b'&') => {
                    self.at += 1;
                    Token::Operator(AND)
                }
                b'|' if next == Some(b'|') => {
                    self.at += 1;
                    Token::Operator(OR)
                }
                // `==`, `!=`, `<=`, `>=` are one token; a lone `=`, `&` or `|` is Cedar's to refuse.
                b'=' | b'!' | b'<' | b'>' if next == Some(b'=') => {
                    self.at += 1;
                    Token::Operator(RELATION)
                }
                b'<' | b'>' => Token::Operator(RELATION),
                b'!' => Token::Operator(UNARY),
                b'-' => Token::Minus,
                b'+' => Token::Operator(ADD),
                b'*' | b'/' | b'%' => Token::Operator(MULTIPLY),
                b'.' => Token::Operator(MEMBER),
                _ => Token::Other,
            };
            return Some((start, token));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Root,
    Bracket,
    /// An `if`: its condition and branches are siblings, and the last one ends where the
    /// level around it ends.
    If {
        then: bool,
        otherwise: bool,
    },
}

/// One bracket (or `if`) open at the scan's position.
#[derive(Debug)]
struct Level {
    kind: Kind,
    /// The length of the operator chain of each tier being read, and the longest so far.
    chain: [usize; TIERS],
    longest: [usize; TIERS],
    /// The sum of `longest`: the levels the operators of this segment can stack.
    own: usize,
    /// The deepest bracket closed in this segment, its own levels included.
    child: usize,
    /// The deepest finished segment (before a `,`, a `then`, an `else`).
    done: usize,
}

impl Level {
    fn new(kind: Kind) -> Self {
        Level { kind, chain: [0; TIERS], longest: [0; TIERS], own: 0, child: 0, done: 0 }
    }
}

/// An upper bound of the depth of the tree Cedar builds, kept as the text is scanned.
///
/// Between two brackets a path from the root to a leaf crosses at most one operator chain of
/// each precedence tier and then at most one bracket; so a level's depth is at most the sum of
/// its longest chain per tier plus its deepest bracket, and the depth at the scan's position
/// at most the sum of that over the open levels (plus one per level). `total` is that sum; it
/// only grows within a segment, and a closed bracket keeps counting through its parent (later
/// operators of the parent stack on top of it), so checking `total` after every token bounds
/// every node's depth.
struct Depth {
    levels: Vec<Level>,
    /// INVARIANT: the sum over `levels` of `own + child`, plus one per level but the root.
    total: usize,
}

impl Depth {
    fn new() -> Self {
        Depth { levels: vec![Level::new(Kind::Root)], total: 0 }
    }

    fn operator(&mut self, tier: usize, amount: usize, ends_operands: bool) {
        let Some(level) = self.levels.last_mut() else { return };
        level.chain[tier] += amount;
        if ends_operands {
            // The operand chains of the tighter tiers end here; the next operand starts new ones.
            level.chain[tier + 1..].iter_mut().for_each(|c| *c = 0);
        }
        if level.chain[tier] > level.longest[tier] {
            let grown = level.chain[tier] - level.longest[tier];
            level.longest[tier] = level.chain[tier];
            level.own += grown;
            self.total += grown;
        }
    }

    fn open(&mut self, kind: Kind) {
        self.levels.push(Level::new(kind));
        self.total += 1;
    }

    /// Closes the innermost level (never the root) into its parent.
    fn close(&mut self) {
        if self.levels.len() < 2 {
            return;
        }
        let Some(level) = self.levels.pop() else { return };
        self.total -= level.own + level.child + 1;
        let depth = 1 + level.done.max(level.own + level.child);
        if let Some(parent) = self.levels.last_mut()
            && depth > parent.child
        {
            self.total += depth - parent.child;
            parent.child = depth;
        }
    }

    /// Ends the innermost level's segment: what follows is a sibling of what came before.
    fn end_segment(&mut self) {
        let Some(level) = self.levels.last_mut() else { return };
        self.total -= level.own + level.child;
        let done = level.done.max(level.own + level.child);
        *level = Level { done, ..Level::new(level.kind) };
    }

    /// Closes the `if`s at the top: all of them, or those already in their `else` branch.
    fn close_ifs(&mut self, only_in_else: bool) {
        while let Some(Level { kind: Kind::If { otherwise, .. }, .. }) = self.levels.last() {
            if only_in_else && !otherwise {
                break;
            }
            self.close();
        }
    }

    fn close_bracket(&mut self) {
        self.close_ifs(false);
        if matches!(self.levels.last(), Some(Level { kind: Kind::Bracket, .. })) {
            self.close();
        }
    }

    fn separator(&mut self) {
        self.close_ifs(false);
        self.end_segment();
    }

    /// `then` (`else_` false) or `else` (true): the next branch of the innermost open `if`.
    fn branch(&mut self, else_: bool) {
        self.close_ifs(true);
        let Some(level) = self.levels.last_mut() else { return };
        match &mut level.kind {
            Kind::If { then, otherwise } if !else_ && !*then => *then = true,
            Kind::If { then: true, otherwise } if else_ && !*otherwise => *otherwise = true,
            _ => return,
        }
        self.end_segment();
    }
}

/// What a scan found: the largest bound, up to where it stopped.
struct Scan {
    deepest: usize,
    /// The offset of the token at which the bound first exceeded the limit (the scan stops there).
    exceeded_at: Option<usize>,
}

fn scan(src: &str, syntax: Syntax, limit: usize) -> Scan {
    let mut depth = Depth::new();
    // Whether the last token ended an operand: then `-` subtracts, `[` indexes, `(` calls.
    let mut after_operand = false;
    // Inside `e has a.b.c`: each step of the path is one more `has` and one more attribute
    // access on `e`, stacked on top of it.
    let mut has_path = false;
    let mut deepest = 0;
    for (offset, token) in Tokens::new(src, syntax) {
        let mut operand = false;
        let mut in_has_path = false;
        match token {
            Token::Open(bracket) => {
                if after_operand && bracket == b'[' {
                    depth.operator(MEMBER, 1, false);
                }
                depth.open(Kind::Bracket);
            }
            Token::Close => {
                depth.close_bracket();
                operand = true;
            }
            Token::Separator => depth.separator(),
            Token::Minus if after_operand => depth.operator(ADD, 1, true),
            Token::Minus => depth.operator(UNARY, 1, true),
            Token::Operator(MEMBER) if has_path => {
                depth.operator(RELATION, 2, false);
                in_has_path = true;
            }
            Token::Operator(tier) => depth.operator(tier, 1, true),
            Token::Ident(word) if syntax == Syntax::Policy => match word {
                "if" => depth.open(Kind::If { then: false, otherwise: false }),
                "then" => depth.branch(false),
                "else" => depth.branch(true),
                // A policy's conditions are joined by `&&`.
                "when" | "unless" => depth.operator(OR, 1, true),
                "has" => {
                    depth.operator(RELATION, 1, false);
                    in_has_path = true;
                }
                "in" | "like" | "is" => depth.operator(RELATION, 1, true),
                _ => {
                    operand = true;
                    in_has_path = has_path;
                }
            },
            Token::Literal => {
                operand = true;
                in_has_path = has_path;
            }
            Token::Ident(_) | Token::Other => operand = true,
        }
        after_operand = operand;
        has_path = in_has_path;
        deepest = deepest.max(depth.total);
        if depth.total > limit {
            return Scan { deepest, exceeded_at: Some(offset) };
        }
    }
    Scan { deepest, exceeded_at: None }
}

/// Checks a schema as Cedar's JSON form of it (`SchemaFragment::to_json_value`), for what the
/// text alone does not show: a common type used inside another nests through it (`type A =
/// Set<B>; type B = Set<C>; …`), and Cedar walks the entity type and action hierarchies
/// recursively. `src` is the schema's text, to point at the declaration at fault.
pub fn check_schema_json<'a>(json: &'a Value, src: &str) -> Result<(), NestingError> {
    let Value::Object(namespaces) = json else { return Ok(()) };
    let section = |body: &'a Value, key: &str| body.get(key).and_then(Value::as_object).into_iter().flatten();
    let mut common: HashMap<String, (&str, &Value)> = HashMap::new();
    let mut entity_types: HashSet<String> = HashSet::new();
    let mut roots: Vec<(String, &str, &Value)> = Vec::new();
    let mut actions = 0usize;
    for (ns, body) in namespaces {
        let qualify = |name: &str| if ns.is_empty() { name.to_string() } else { format!("{ns}::{name}") };
        for (name, ty) in section(body, "commonTypes") {
            common.insert(qualify(name), (ns, ty));
        }
        for (name, decl) in section(body, "entityTypes") {
            entity_types.insert(qualify(name));
            for key in ["shape", "tags"] {
                if let Some(ty) = decl.get(key) {
                    roots.push((format!("entity type `{}`", qualify(name)), ns, ty));
                }
            }
        }
        for (name, decl) in section(body, "actions") {
            actions += 1;
            if let Some(ty) = decl.get("appliesTo").and_then(|a| a.get("context")) {
                roots.push((format!("the context of action `{name}`"), ns, ty));
            }
        }
    }
    if entity_types.len() > MAX_SCHEMA_NAMES {
        return Err(NestingError::TooMany { what: "entity types", count: entity_types.len() });
    }
    if actions > MAX_SCHEMA_NAMES {
        return Err(NestingError::TooMany { what: "actions", count: actions });
    }
    let types = TypeGraph { common: &common, entity_types: &entity_types };
    let costs = types.costs().map_err(|name| {
        let offset = declaration(src, name);
        NestingError::Cycle { name: name.to_string(), offset }
    })?;
    let mut names: Vec<&String> = common.keys().collect();
    names.sort();
    for name in names {
        if costs.get(name.as_str()).copied().unwrap_or(0) > MAX_NESTING {
            let offset = declaration(src, name);
            return Err(NestingError::ThroughCommonTypes { what: format!("common type `{name}`"), offset });
        }
    }
    for (what, ns, ty) in &roots {
        if types.cost_of(ns, ty, &costs) > MAX_NESTING {
            return Err(NestingError::ThroughCommonTypes { what: what.clone(), offset: None });
        }
    }
    Ok(())
}

/// The common types of a schema and what they refer to.
struct TypeGraph<'a> {
    /// Qualified name to (namespace, definition).
    common: &'a HashMap<String, (&'a str, &'a Value)>,
    entity_types: &'a HashSet<String>,
}

impl TypeGraph<'_> {
    /// The common type a name used in namespace `ns` refers to, as Cedar resolves it: the
    /// namespace's common type, else its entity type (not a common type), else the common type
    /// of the empty namespace.
    fn resolve(&self, ns: &str, name: &str) -> Option<&str> {
        if name.contains("::") {
            return self.common.get_key_value(name).map(|(k, _)| k.as_str());
        }
        let qualified = if ns.is_empty() { name.to_string() } else { format!("{ns}::{name}") };
        if let Some((k, _)) = self.common.get_key_value(&qualified) {
            return Some(k);
        }
        if self.entity_types.contains(&qualified) {
            return None;
        }
        self.common.get_key_value(name).map(|(k, _)| k.as_str())
    }

    /// The levels of a type's own tree, and the common types it uses with the level they are at.
    fn walk<'v>(&self, ns: &str, ty: &'v Value) -> (usize, Vec<(usize, &str)>) {
        let mut deepest = 0;
        let mut uses = Vec::new();
        let mut stack: Vec<(usize, &'v Value)> = vec![(1, ty)];
        while let Some((level, ty)) = stack.pop() {
            deepest = deepest.max(level);
            let kind = ty.get("type").and_then(Value::as_str).unwrap_or("");
            match kind {
                "Set" => stack.extend(ty.get("element").map(|e| (level + 1, e))),
                "Record" => {
                    let attributes = ty.get("attributes").and_then(Value::as_object);
                    stack.extend(attributes.into_iter().flat_map(Map::values).map(|a| (level + 1, a)));
                }
                "Entity" | "Extension" | "String" | "Long" | "Boolean" => {}
                "EntityOrCommon" => {
                    let name = ty.get("name").and_then(Value::as_str).unwrap_or("");
                    uses.extend(self.resolve(ns, name).map(|n| (level, n)));
                }
                name => uses.extend(self.resolve(ns, name).map(|n| (level, n))),
            }
        }
        (deepest, uses)
    }

    /// The nesting of a type counted through the common types it uses (already in `costs`).
    fn cost_of(&self, ns: &str, ty: &Value, costs: &HashMap<&str, usize>) -> usize {
        let (own, uses) = self.walk(ns, ty);
        // A use stands where the used type's root then stands: one level, not two.
        uses.iter().map(|(level, name)| level - 1 + costs.get(name).copied().unwrap_or(0)).fold(own, usize::max)
    }

    /// Every common type's nesting through the common types it uses, or the name of one that
    /// is part of a cycle. Depth first without recursion: the chain of uses can be long.
    fn costs(&self) -> Result<HashMap<&str, usize>, &str> {
        let mut costs: HashMap<&str, usize> = HashMap::new();
        // INVARIANT: the open names are the current path of the search (a name is finished
        // before the search moves to its siblings), so reaching one again is a cycle.
        let mut open: HashSet<&str> = HashSet::new();
        let mut names: Vec<&str> = self.common.keys().map(String::as_str).collect();
        names.sort_unstable();
        for start in names {
            let mut stack: Vec<(&str, bool)> = vec![(start, false)];
            while let Some((name, expanded)) = stack.pop() {
                let Some((ns, ty)) = self.common.get(name) else { continue };
                if costs.contains_key(name) {
                    continue;
                }
                if expanded {
                    costs.insert(name, self.cost_of(ns, ty, &costs));
                    open.remove(name);
                    continue;
                }
                if !open.insert(name) {
                    return Err(name);
                }
                stack.push((name, true));
                for (_, used) in self.walk(ns, ty).1 {
                    if open.contains(used) {
                        return Err(used);
                    }
                    if !costs.contains_key(used) {
                        stack.push((used, false));
                    }
                }
            }
        }
        Ok(costs)
    }
}

/// The offset of `type NAME` (the last part of a qualified name) in a schema's text.
fn declaration(src: &str, name: &str) -> Option<usize> {
    let short = name.rsplit("::").next().unwrap_or(name);
    let mut previous = None;
    for (offset, token) in Tokens::new(src, Syntax::Schema) {
        if let Token::Ident(id) = token {
            if previous == Some("type") && id == short {
                return Some(offset);
            }
            previous = Some(id);
        } else {
            previous = None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema_depth(src: &str) -> usize {
        scan(src, Syntax::Schema, usize::MAX).deepest
    }

    #[test]
    fn the_sample_bundle_nests_far_below_the_limit() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let mut deepest = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "cedar") {
                deepest = deepest.max(policy_depth(&std::fs::read_to_string(&path).unwrap()));
            }
        }
        assert!((4..=MAX_NESTING / 16).contains(&deepest), "{deepest}");
        let schema = std::fs::read_to_string(dir.join("schema.cedarschema")).unwrap();
        assert!((2..=8).contains(&schema_depth(&schema)), "{}", schema_depth(&schema));
    }

    #[test]
    fn brackets_and_operator_chains_count() {
        assert_eq!(policy_depth("true"), 0);
        assert_eq!(policy_depth("((true))"), 2);
        assert_eq!(policy_depth("[[1], [2], [[3]]]"), 3);
        // Eq(Add(Add(1, 1), 1), 3)
        assert_eq!(policy_depth("1 + 1 + 1 == 3"), 3);
        assert_eq!(policy_depth("f(1 + 1, 2 + 2 + 2)"), 3);
        // Or(Ne(a, b), Le(c, d)): one chain per tier, not one level per operator.
        assert_eq!(policy_depth("a != b || c <= d"), 2);
        assert_eq!(policy_depth("a.b == c.d || a.b == c.d || a.b == c.d"), 4);
        // Separators end an operand: siblings do not add up.
        assert_eq!(
            policy_depth("permit(principal, action in [A::\"x\"], resource); forbid(principal, action, resource);"),
            3
        );
    }

    #[test]
    fn a_closed_bracket_sinks_under_the_operators_after_it() {
        // Add(Add((((x))), 1), 1): the brackets' content ends up 5 deep.
        assert_eq!(policy_depth("(((x))) + 1 + 1"), 5);
        assert_eq!(policy_depth("(((x)), y) + 1"), 4);
    }

    #[test]
    fn if_branches_are_siblings() {
        assert_eq!(policy_depth("if a then b else if c then d else e"), 2);
        assert_eq!(policy_depth("if a || b then c || d else e || f"), 2);
        assert_eq!(policy_depth("if if a then b else c then d else e"), 2);
        assert_eq!(policy_depth("(if a then b else c) || d"), 3);
        assert_eq!(policy_depth("[if a then b else c, if a then (b) else c]"), 3);
    }

    #[test]
    fn has_paths_and_accesses_count() {
        // And(Has(context, a), Has(GetAttr(context, a), b)) under Not, And, In.
        assert_eq!(policy_depth("principal in Group::\"x\" && !(context has a.b)"), 7);
        assert_eq!(policy_depth("context has a.b.c"), 5);
        assert_eq!(policy_depth("x[\"a\"][\"b\"][\"c\"]"), 5);
        assert_eq!(policy_depth("[1].contains(1)"), 3);
    }

    #[test]
    fn minus_is_binary_after_an_operand() {
        // Mul(Mul(Mul(a, b), Neg(c)), d): the unary minus does not end the `*` chain.
        assert_eq!(policy_depth("a * b * -c * d"), 4);
        assert_eq!(policy_depth("a - b - c"), 2);
        assert_eq!(policy_depth("- - - 1"), 3);
    }

    #[test]
    fn conditions_count_as_operators() {
        let src = "permit(principal, action, resource) when { true } when { true } unless { false };";
        assert_eq!(policy_depth(src), 5);
    }

    #[test]
    fn strings_and_comments_do_not_count() {
        let src = "context.x == \"((([[[{{{ \\\" ((( \" // (((((\n";
        assert_eq!(policy_depth(src), 2);
        assert_eq!(policy_depth("// ((((((\n(true)"), 1);
        assert_eq!(policy_depth("principal.inner || principal.iffy"), 2);
    }

    #[test]
    fn unbalanced_text_does_not_underflow() {
        assert_eq!(policy_depth(")))] } (("), 2);
        assert_eq!(policy_depth("\"unterminated (((("), 0);
        assert_eq!(policy_depth("x ."), 1);
        assert_eq!(policy_depth("then else if then else else"), 1);
    }

    #[test]
    fn too_deep_policies_are_found_where_they_overflow() {
        let src = format!("when {{ {}true{} }}", "(".repeat(300), ")".repeat(300));
        let err = check_policies(&src).unwrap_err();
        // `when`, its brace, then 254 parentheses.
        assert_eq!(err.offset(), Some(7 + MAX_NESTING - 2));
        assert!(err.to_string().starts_with("nested too deeply: expressions may nest at most 256 levels"), "{err}");
        // A chain of operators is as deep as it is long.
        assert!(check_policies(&vec!["1"; MAX_NESTING + 2].join(" + ")).is_err());
        assert!(check_policies(&vec!["1"; MAX_NESTING + 1].join(" + ")).is_ok());
        let ifs = "if a then b else ".repeat(MAX_NESTING + 1);
        assert!(check_policies(&ifs).is_err());
    }

    #[test]
    fn schema_brackets_count_angle_brackets_too() {
        let deep = format!("type T = {}String{};", "Set<".repeat(MAX_NESTING + 1), ">".repeat(MAX_NESTING + 1));
        assert_eq!(check_schema_text(&deep).unwrap_err().offset(), Some(9 + 4 * (MAX_NESTING + 1) - 1));
        let ok = format!("type T = {}String{};", "Set<".repeat(MAX_NESTING), ">".repeat(MAX_NESTING));
        assert!(check_schema_text(&ok).is_ok());
        // In a schema `<` is a bracket, not an operator; nothing else counts.
        assert!(check_schema_text(&"entity A in [B] { a: Long };\n".repeat(10_000)).is_ok());
    }

    #[test]
    fn common_types_are_capped_before_cedar_parses_them() {
        let chain = |n: usize| (0..n).map(|i| format!("type T{i} = T{};\n", i + 1)).collect::<String>();
        assert!(check_schema_text(&chain(MAX_SCHEMA_NAMES)).is_ok());
        let err = check_schema_text(&chain(MAX_SCHEMA_NAMES + 1)).unwrap_err();
        assert_eq!(err.to_string(), "too many common types: 1001 (at most 1000)");
        // An attribute named `type` is not a declaration.
        assert!(check_schema_text(&"entity A { type: String };\n".repeat(2000)).is_ok());
    }

    fn schema(namespaces: serde_json::Value) -> Result<(), NestingError> {
        check_schema_json(&namespaces, "")
    }

    fn set_of(name: &str) -> serde_json::Value {
        serde_json::json!({"type": "Set", "element": {"type": "EntityOrCommon", "name": name}})
    }

    #[test]
    fn common_types_nest_through_each_other() {
        let mut common = serde_json::Map::new();
        for i in 0..MAX_NESTING {
            common.insert(format!("T{i}"), set_of(&format!("T{}", i + 1)));
        }
        common.insert(format!("T{MAX_NESTING}"), serde_json::json!({"type": "EntityOrCommon", "name": "String"}));
        let err = schema(serde_json::json!({"": {"commonTypes": common.clone(), "entityTypes": {}, "actions": {}}}))
            .unwrap_err();
        assert_eq!(err, NestingError::ThroughCommonTypes { what: "common type `T0`".into(), offset: None });
        common.remove("T0");
        assert!(schema(serde_json::json!({"": {"commonTypes": common, "entityTypes": {}, "actions": {}}})).is_ok());
    }

    #[test]
    fn entity_shapes_and_contexts_count_their_common_types() {
        let mut common = serde_json::Map::new();
        for i in 1..MAX_NESTING {
            common.insert(format!("T{i}"), set_of(&format!("T{}", i + 1)));
        }
        common.insert(format!("T{MAX_NESTING}"), serde_json::json!({"type": "Long"}));
        let shape = serde_json::json!({"type": "Record", "attributes": {"a": set_of("T1")}});
        let err = schema(
            serde_json::json!({"NS": {"commonTypes": common, "entityTypes": {"E": {"shape": shape}}, "actions": {}}}),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "entity type `NS::E` is nested too deeply: with the common types it uses, more than 256 levels"
        );
    }

    #[test]
    fn names_resolve_as_cedar_resolves_them() {
        let deep = serde_json::json!({"type": "Set", "element": {"type": "Set", "element": {"type": "Long"}}});
        let alias = serde_json::json!({"type": "EntityOrCommon", "name": "B"});
        let long = serde_json::json!({"type": "Long"});
        let common = HashMap::from([
            ("B".to_string(), ("", &deep)),
            ("NS::A".to_string(), ("NS", &alias)),
            ("NS::B".to_string(), ("NS", &long)),
        ]);
        let entity_types = HashSet::from(["Other::B".to_string()]);
        let graph = TypeGraph { common: &common, entity_types: &entity_types };
        // `NS::A` uses `B`: the namespace's own `NS::B`, not the empty namespace's deeper `B`.
        let costs = graph.costs().unwrap();
        assert_eq!((costs["B"], costs["NS::B"], costs["NS::A"]), (3, 1, 1));
        assert_eq!(graph.resolve("NS", "B"), Some("NS::B"));
        assert_eq!(graph.resolve("Elsewhere", "B"), Some("B"));
        // An entity type of the namespace hides the empty namespace's common type.
        assert_eq!(graph.resolve("Other", "B"), None);
        assert_eq!(graph.resolve("", "NS::B"), Some("NS::B"));
    }

    #[test]
    fn cycles_are_named() {
        let json = serde_json::json!({"": {"commonTypes": {"A": set_of("B"), "B": set_of("A")}}});
        let err = check_schema_json(&json, "type A = Set<B>;\ntype B = Set<A>;").unwrap_err();
        assert!(
            matches!(&err, NestingError::Cycle { name, offset: Some(5 | 22) } if name == "A" || name == "B"),
            "{err:?}"
        );
    }

    #[test]
    fn hierarchies_are_capped() {
        let many: serde_json::Map<String, Value> =
            (0..=MAX_SCHEMA_NAMES).map(|i| (format!("E{i}"), serde_json::json!({}))).collect();
        let err = schema(serde_json::json!({"": {"entityTypes": many.clone()}})).unwrap_err();
        assert_eq!(err.to_string(), "too many entity types: 1001 (at most 1000)");
        let err = schema(serde_json::json!({"": {"actions": many}})).unwrap_err();
        assert_eq!(err.to_string(), "too many actions: 1001 (at most 1000)");
    }

    #[test]
    fn declarations_are_found_in_the_text() {
        let src = "// type A\nnamespace NS { type A = Long; }";
        assert_eq!(declaration(src, "NS::A"), Some(30));
        assert_eq!(declaration(src, "B"), None);
    }
}
