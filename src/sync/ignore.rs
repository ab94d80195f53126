//! `.offloadignore`: gitignore syntax at a mount's root, applied to sync in
//! both directions. Pure.
//!
//! Supported as in gitignore: `#` comments, `!` negation (the last matching
//! rule wins), a leading or inner `/` anchors the pattern to the root, a
//! trailing `/` matches directories only, `*` and `?` stay within one path
//! component, `**` spans components, `[...]` classes, `\` escapes. A path
//! inside an ignored directory is ignored too.

pub const IGNORE_FILE: &str = ".offloadignore";

#[derive(Debug, Clone, Default)]
pub struct IgnoreRules {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    pattern: Vec<char>,
    negated: bool,
    dir_only: bool,
    /// Anchored patterns match the whole relative path; others any suffix
    /// of components (`*.log` anywhere).
    anchored: bool,
}

impl IgnoreRules {
    pub fn parse(text: &str) -> Self {
        let rules = text.lines().filter_map(parse_line).collect();
        Self { rules }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether a relative path (`a/b/c`) is excluded from sync.
    pub fn is_ignored(&self, path: &str, is_dir: bool) -> bool {
        if self.rules.is_empty() {
            return false;
        }
        // gitignore never re-includes what sits in an excluded directory.
        let mut prefix_end = 0;
        while let Some(offset) = path[prefix_end..].find('/') {
            let parent = &path[..prefix_end + offset];
            if self.matches(parent, true) {
                return true;
            }
            prefix_end += offset + 1;
        }
        self.matches(path, is_dir)
    }

    fn matches(&self, path: &str, is_dir: bool) -> bool {
        let path: Vec<char> = path.chars().collect();
        let mut ignored = false;
        for rule in &self.rules {
            if rule.dir_only && !is_dir {
                continue;
            }
            if rule.matches(&path) {
                ignored = !rule.negated;
            }
        }
        ignored
    }
}

fn parse_line(line: &str) -> Option<Rule> {
    let mut line = line.trim_end_matches('\r');
    // Trailing spaces are ignored unless escaped.
    while line.ends_with(' ') && !line.ends_with("\\ ") {
        line = &line[..line.len() - 1];
    }
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (negated, line) = match line.strip_prefix('!') {
        Some(rest) => (true, rest),
        None => (false, line.strip_prefix("\\!").map_or(line, |_| &line[1..])),
    };
    let line = if line.starts_with("\\#") { &line[1..] } else { line };
    let (dir_only, line) = match line.strip_suffix('/') {
        Some(rest) => (true, rest),
        None => (false, line),
    };
    let anchored = line.trim_end_matches('/').contains('/');
    let line = line.strip_prefix('/').unwrap_or(line);
    if line.is_empty() {
        return None;
    }
    Some(Rule { pattern: line.chars().collect(), negated, dir_only, anchored })
}

impl Rule {
    fn matches(&self, path: &[char]) -> bool {
        if self.anchored {
            return glob(&self.pattern, path);
        }
        // Unanchored: the pattern matches the last components of the path.
        let mut start = 0;
        loop {
            if glob(&self.pattern, &path[start..]) {
                return true;
            }
            match path[start..].iter().position(|c| *c == '/') {
                Some(offset) => start += offset + 1,
                None => return false,
            }
        }
    }
}

/// Matches a gitignore glob against a whole relative path.
fn glob(pattern: &[char], text: &[char]) -> bool {
    match pattern.first() {
        None => text.is_empty(),
        Some('*') if pattern.get(1) == Some(&'*') => {
            // `**/` matches zero or more directories; a trailing `**` everything.
            let rest = &pattern[2..];
            let rest = rest.strip_prefix(&['/']).unwrap_or(rest);
            if rest.is_empty() {
                return true;
            }
            let mut start = 0;
            loop {
                if glob(rest, &text[start..]) {
                    return true;
                }
                match text[start..].iter().position(|c| *c == '/') {
                    Some(offset) => start += offset + 1,
                    None => return false,
                }
            }
        }
        Some('*') => {
            let rest = &pattern[1..];
            for end in 0..=text.len() {
                if glob(rest, &text[end..]) {
                    return true;
                }
                if text.get(end) == Some(&'/') {
                    return false;
                }
            }
            false
        }
        Some('?') => text.first().is_some_and(|c| *c != '/') && glob(&pattern[1..], &text[1..]),
        Some('[') => match class(&pattern[1..], text.first().copied()) {
            Some((true, consumed)) => glob(&pattern[1 + consumed..], &text[1..]),
            Some((false, _)) => false,
            // An unclosed `[` is a literal.
            None => text.first() == Some(&'[') && glob(&pattern[1..], &text[1..]),
        },
        Some('\\') if pattern.len() > 1 => {
            text.first() == Some(&pattern[1]) && glob(&pattern[2..], &text[1..])
        }
        Some(literal) => text.first() == Some(literal) && glob(&pattern[1..], &text[1..]),
    }
}

/// `[...]` after the `[`: whether `c` is in the class, and how many pattern
/// characters the class took (up to and including `]`).
fn class(pattern: &[char], c: Option<char>) -> Option<(bool, usize)> {
    let c = c.filter(|c| *c != '/');
    let (negated, mut i) = match pattern.first() {
        Some('!' | '^') => (true, 1),
        _ => (false, 0),
    };
    let mut matched = false;
    let mut first = true;
    while i < pattern.len() {
        let current = pattern[i];
        if current == ']' && !first {
            let hit = c.is_some() && matched != negated;
            return Some((hit, i + 1));
        }
        first = false;
        if pattern.get(i + 1) == Some(&'-') && pattern.get(i + 2).is_some_and(|end| *end != ']') {
            let end = pattern[i + 2];
            matched |= c.is_some_and(|c| current <= c && c <= end);
            i += 3;
        } else {
            matched |= c == Some(current);
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> IgnoreRules {
        IgnoreRules::parse(text)
    }

    #[test]
    fn nothing_is_ignored_by_default() {
        assert!(!rules("").is_ignored("node_modules/x", false));
        assert!(!rules("# only a comment\n\n").is_ignored("a", false));
    }

    #[test]
    fn unanchored_patterns_match_anywhere() {
        let r = rules("*.log\nbuild/\n");
        assert!(r.is_ignored("x.log", false));
        assert!(r.is_ignored("deep/er/x.log", false));
        assert!(!r.is_ignored("x.logs", false));
        assert!(r.is_ignored("build", true));
        assert!(!r.is_ignored("build", false), "build/ matches directories only");
        assert!(r.is_ignored("src/build/out.o", false), "inside an ignored directory");
    }

    #[test]
    fn anchored_patterns_match_from_the_root() {
        let r = rules("/target\ndocs/*.md\n");
        assert!(r.is_ignored("target", true));
        assert!(!r.is_ignored("sub/target", true));
        assert!(r.is_ignored("docs/a.md", false));
        assert!(!r.is_ignored("docs/sub/a.md", false), "* stays within a component");
        assert!(!r.is_ignored("x/docs/a.md", false));
    }

    #[test]
    fn double_star_spans_directories() {
        let r = rules("**/cache\na/**/z\nlogs/**\n");
        assert!(r.is_ignored("cache", true));
        assert!(r.is_ignored("x/y/cache", true));
        assert!(r.is_ignored("a/z", false));
        assert!(r.is_ignored("a/b/c/z", false));
        assert!(r.is_ignored("logs/1/2", false));
        assert!(!r.is_ignored("logs", true));
    }

    #[test]
    fn negation_and_the_last_rule_wins() {
        let r = rules("*.txt\n!keep.txt\n");
        assert!(r.is_ignored("a.txt", false));
        assert!(!r.is_ignored("keep.txt", false));
        assert!(!r.is_ignored("d/keep.txt", false));
        let r = rules("out/\n!out/keep\n");
        assert!(r.is_ignored("out/keep", false), "no re-include inside an ignored directory");
    }

    #[test]
    fn classes_question_marks_and_escapes() {
        let r = rules("file[0-9].txt\n?.tmp\n\\#hash\n[!a]b\n");
        assert!(r.is_ignored("file7.txt", false));
        assert!(!r.is_ignored("filex.txt", false));
        assert!(r.is_ignored("x.tmp", false));
        assert!(!r.is_ignored("xy.tmp", false));
        assert!(r.is_ignored("#hash", false));
        assert!(r.is_ignored("cb", false));
        assert!(!r.is_ignored("ab", false));
    }
}
