//! Parsing WeChat event pushes (TEMPLATESENDJOBFINISH and the rest).
