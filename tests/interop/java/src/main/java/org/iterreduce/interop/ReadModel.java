package org.iterreduce.interop;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.File;
import java.io.RandomAccessFile;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.util.Arrays;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.apache.avro.Schema;
import org.apache.avro.file.DataFileReader;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericRecord;

/**
 * Reads a dbn {@code model.avro} with Avro's own DataFileReader and GenericDatumReader, as
 * docs/model-format.md describes it, and runs its forward pass on examples of uint8 pixels.
 *
 * <pre>java org.iterreduce.interop.ReadModel MODEL.avro INPUTS.u8</pre>
 *
 * INPUTS.u8 holds the examples' pixels, one byte each, row after row (n_0 bytes a row).
 * Prints one JSON object: what the file says (schema, codec, dbn.meta, the arrays and their
 * checked SHA-256), and per example its label, class probabilities and hidden activations.
 * Exits 2, naming the array, when an array's data does not match the SHA-256 in dbn.meta,
 * and 3 when the file is not what the document says (shapes, dtype, names).
 */
public final class ReadModel {
  private ReadModel() {}

  static final class Bad extends Exception {
    final int status;

    Bad(int status, String message) {
      super(message);
      this.status = status;
    }
  }

  private record Array(String dtype, long[] shape, float[] values) {}

  public static void main(String[] args) throws Exception {
    if (args.length != 2) {
      System.err.println("usage: ReadModel MODEL.avro INPUTS.u8");
      System.exit(64);
    }
    try {
      System.out.println(run(new File(args[0]), Path.of(args[1])));
    } catch (Bad e) {
      System.err.println("ReadModel: " + args[0] + ": " + e.getMessage());
      System.exit(e.status);
    }
  }

  static String run(File model, Path inputs) throws Exception {
    ObjectMapper json = new ObjectMapper();
    ObjectNode out = json.createObjectNode();
    Map<String, Array> arrays = new LinkedHashMap<>();
    byte[] metaText;
    JsonNode meta;
    try (DataFileReader<GenericRecord> reader =
        new DataFileReader<>(model, new GenericDatumReader<GenericRecord>())) {
      Schema schema = reader.getSchema();
      out.put("schema", schema.getFullName());
      ArrayNode fields = out.putArray("fields");
      for (Schema.Field f : schema.getFields()) {
        fields.addObject().put("name", f.name()).put("type", f.schema().toString());
      }
      out.put("codec", reader.getMetaString("avro.codec"));
      metaText = reader.getMeta("dbn.meta");
      if (metaText == null) {
        throw new Bad(3, "no dbn.meta in the file's metadata");
      }
      meta = json.readTree(metaText);
      out.set("meta", meta);
      JsonNode sums = meta.path("sha256");
      ObjectNode checked = out.putObject("sha256_checked");
      for (GenericRecord rec : reader) {
        String name = rec.get("name").toString();
        String dtype = rec.get("dtype").toString();
        @SuppressWarnings("unchecked")
        List<Long> dims = (List<Long>) rec.get("shape");
        long[] shape = dims.stream().mapToLong(Long::longValue).toArray();
        ByteBuffer data = (ByteBuffer) rec.get("data");
        byte[] bytes = new byte[data.remaining()];
        data.duplicate().get(bytes);
        String sha = HexFormat.of().formatHex(MessageDigest.getInstance("SHA-256").digest(bytes));
        String expected = sums.path(name).asText(null);
        if (!sha.equals(expected)) {
          throw new Bad(2, "array " + name + ": the SHA-256 of its data is " + sha + ", dbn.meta says "
              + expected);
        }
        checked.put(name, sha);
        if (!dtype.equals("<f4")) {
          throw new Bad(3, "array " + name + ": dtype " + dtype + ", expected <f4");
        }
        long count = Arrays.stream(shape).reduce(1, Math::multiplyExact);
        if (count * 4 != bytes.length) {
          throw new Bad(3, "array " + name + ": shape " + Arrays.toString(shape) + " of " + dtype + " needs "
              + count * 4 + " bytes, its data has " + bytes.length);
        }
        float[] values = new float[(int) count];
        ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer().get(values);
        arrays.put(name, new Array(dtype, shape, values));
      }
    }
    for (var it = meta.path("sha256").fieldNames(); it.hasNext(); ) {
      String name = it.next();
      if (!arrays.containsKey(name)) {
        throw new Bad(3, "dbn.meta has the SHA-256 of array " + name + ", which the file does not hold");
      }
    }
    ObjectNode shapes = out.putObject("arrays");
    arrays.forEach((name, a) -> {
      ArrayNode s = shapes.putObject(name).put("dtype", a.dtype()).putArray("shape");
      for (long d : a.shape()) {
        s.add(d);
      }
    });

    // the sync marker: the last 16 bytes of the file (every block ends with it)
    byte[] sync = new byte[16];
    try (RandomAccessFile f = new RandomAccessFile(model, "r")) {
      f.seek(f.length() - 16);
      f.readFully(sync);
    }
    byte[] metaSha = MessageDigest.getInstance("SHA-256").digest(metaText);
    out.put("sync_is_meta_sha256_prefix", Arrays.equals(sync, Arrays.copyOf(metaSha, 16)));

    // the forward pass of docs/model-format.md
    if (!"classifier".equals(meta.path("kind").asText())) {
      throw new Bad(3, "kind " + meta.path("kind") + ": only a classifier has labels");
    }
    int[] sizes = new int[meta.path("sizes").size()];
    for (int i = 0; i < sizes.length; i++) {
      sizes[i] = meta.path("sizes").get(i).asInt();
    }
    int layers = sizes.length - 1;
    for (int i = 0; i < layers; i++) {
      Array w = arrays.get("W" + i);
      Array b = arrays.get("b" + i);
      if (w == null || b == null || !Arrays.equals(w.shape(), new long[] {sizes[i], sizes[i + 1]})
          || !Arrays.equals(b.shape(), new long[] {sizes[i + 1]})) {
        throw new Bad(3, "layer " + i + ": W" + i + " and b" + i + " do not match sizes "
            + Arrays.toString(sizes));
      }
    }
    byte[] pixels = Files.readAllBytes(inputs);
    if (pixels.length % sizes[0] != 0) {
      throw new Bad(3, inputs + ": " + pixels.length + " bytes are not rows of " + sizes[0]);
    }
    int n = pixels.length / sizes[0];
    ArrayNode labels = out.putArray("labels");
    ArrayNode probabilities = out.putArray("probabilities");
    ArrayNode hidden = out.putArray("hidden"); // [layer k = 1 .. L-1][example][unit]
    for (int k = 1; k < layers; k++) {
      hidden.addArray();
    }
    for (int e = 0; e < n; e++) {
      double[] a = new double[sizes[0]];
      for (int j = 0; j < sizes[0]; j++) {
        a[j] = (pixels[e * sizes[0] + j] & 0xff) / 255.0;
      }
      for (int i = 0; i < layers; i++) {
        float[] w = arrays.get("W" + i).values();
        float[] b = arrays.get("b" + i).values();
        int cols = sizes[i + 1];
        double[] z = new double[cols];
        for (int c = 0; c < cols; c++) {
          z[c] = b[c];
        }
        for (int r = 0; r < a.length; r++) {
          for (int c = 0; c < cols; c++) {
            z[c] += a[r] * w[r * cols + c];
          }
        }
        if (i < layers - 1) {
          for (int c = 0; c < cols; c++) {
            z[c] = 1 / (1 + Math.exp(-z[c]));
          }
          ArrayNode row = ((ArrayNode) hidden.get(i)).addArray();
          for (double v : z) {
            row.add(v);
          }
        } else {
          double max = Arrays.stream(z).max().orElseThrow();
          double sum = 0;
          for (int c = 0; c < cols; c++) {
            z[c] = Math.exp(z[c] - max);
            sum += z[c];
          }
          int best = 0;
          ArrayNode row = probabilities.addArray();
          for (int c = 0; c < cols; c++) {
            z[c] /= sum;
            row.add(z[c]);
            if (z[c] > z[best]) {
              best = c;
            }
          }
          labels.add(best);
        }
        a = z;
      }
    }
    return json.writeValueAsString(out);
  }
}
