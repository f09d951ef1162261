//! candle integration (being written).
