//! Log levels of the lines the core asks the host to write (the host owns the logger).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}
