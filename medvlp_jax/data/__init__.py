"""Data: TFRecord schema and writer, converters (sources/), rendering, text, tokenizer, tf.data pipeline."""
