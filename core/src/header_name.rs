//! Header names as upstreams read them.
//!
//! CGI, WSGI, Rack and PHP fold `-` and `_` into one environment variable (`HTTP_X_USER`), and
//! lighttpd's CGI/FastCGI/SCGI environment folds every character that is not a letter or digit.
//! So two header names are the same header to *some* upstream when they are equal after ASCII
//! lowercasing with every non-alphanumeric byte taken as one separator.

/// `a` and `b` name the same header to the most folding upstream.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| fold(x) == fold(y))
}

/// `name` starts with `prefix`, folded the same way.
pub fn starts_with(name: &str, prefix: &str) -> bool {
    name.len() >= prefix.len() && name.bytes().zip(prefix.bytes()).all(|(x, y)| fold(x) == fold(y))
}

fn fold(c: u8) -> u8 {
    if c.is_ascii_alphanumeric() {
        c.to_ascii_lowercase()
    } else {
        b'-'
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_separator_and_case_alike() {
        for name in ["x-user", "x_user", "X.USER", "x~user", "x+User", "x!user", "x`user", "x|user"] {
            assert!(same(name, "x-user"), "{name}");
        }
        assert!(!same("x-users", "x-user"));
        assert!(!same("xuser", "x-user"));
        assert!(!same("x-uses", "x-user"));
    }

    #[test]
    fn prefixes_fold_too() {
        assert!(starts_with("X_Envoy_Original_Path", "x-envoy-"));
        assert!(!starts_with("x-envo", "x-envoy-"));
    }
}
